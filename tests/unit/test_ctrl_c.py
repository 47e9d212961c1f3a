"""`batch run`'s Ctrl-C: an interrupt that library code swallowed is not lost, and one that
arrives while the command is already exiting with 130 does not kill the exit."""

from __future__ import annotations

import os
import signal

import pytest

from producer.cli import CtrlC


def test_a_swallowed_interrupt_is_raised_again_at_the_next_check() -> None:
    ctrl_c = CtrlC()
    with ctrl_c.installed():
        try:  # as a library that catches too much would
            os.kill(os.getpid(), signal.SIGINT)  # handled before the next line runs
            raise AssertionError("the interrupt was not raised")
        except KeyboardInterrupt:
            pass
        with pytest.raises(KeyboardInterrupt):
            ctrl_c.check()


def test_once_leaving_further_interrupts_are_ignored_and_the_handler_is_put_back() -> None:
    before = signal.getsignal(signal.SIGINT)
    ctrl_c = CtrlC()
    with ctrl_c.installed():
        ctrl_c.leaving = True
        os.kill(os.getpid(), signal.SIGINT)  # no KeyboardInterrupt
        ctrl_c.check()
    assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN  # the exit stays protected
    signal.signal(signal.SIGINT, before)
    quiet = CtrlC()
    with quiet.installed():
        pass
    assert signal.getsignal(signal.SIGINT) is before


def test_a_command_started_with_ctrl_c_ignored_keeps_ignoring_it() -> None:
    # A background job of a shell without job control: the terminal's Ctrl-C is not for it
    before = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        ctrl_c = CtrlC()
        with ctrl_c.installed():
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
            os.kill(os.getpid(), signal.SIGINT)
            ctrl_c.check()
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, before)
