"""Imported first by every script, before torch (which takes seconds to load): Ctrl-C while the imports
run ends in one line, not a traceback. Once main() runs, runs.cli and the run's own handlers take over."""
import sys


def quiet_interrupt(kind, value, traceback):
    if issubclass(kind, KeyboardInterrupt):
        sys.stderr.write("\nStopped while starting; nothing was changed.\n")
    else:
        sys.__excepthook__(kind, value, traceback)


sys.excepthook = quiet_interrupt
