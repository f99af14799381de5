"""SIGTERM / SIGINT become a stop request (xmodal.utils.signals)."""

import os
import signal

import pytest

from xmodal.utils.signals import StopRequest


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_first_signal_is_recorded_not_fatal(sig):
    before = signal.getsignal(sig)
    with StopRequest() as stop:
        assert not stop.requested
        os.kill(os.getpid(), sig)
        assert stop.requested and stop.signum == sig and stop.name == signal.Signals(sig).name
    assert signal.getsignal(sig) is before  # handlers restored


def test_second_signal_is_delivered_with_the_previous_handler():
    seen = []
    old = signal.signal(signal.SIGTERM, lambda s, f: seen.append(s))
    try:
        with StopRequest() as stop:
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGTERM)  # the second one reaches the handler that was there before
            assert stop.signum == signal.SIGTERM
        assert seen == [signal.SIGTERM]
    finally:
        signal.signal(signal.SIGTERM, old)
