"""The disk reader's shutdown, wherever its DiskReader is dropped."""

import threading

from llmrun.weights.streamer import _ReaderState


def test_a_reader_dropped_on_its_own_thread_stops_without_joining_itself():
    """A garbage collection on the reader thread can finalize its DiskReader there (seen in CI as
    "cannot join current thread" from the finalizer): shutdown then only asks the loop to stop."""
    state = _ReaderState([0], [], [])
    errors = []

    def reader_thread():
        try:
            state.shutdown(threading.current_thread())
        except BaseException as err:  # noqa: BLE001 (what the finalizer would have swallowed)
            errors.append(err)

    thread = threading.Thread(target=reader_thread)
    thread.start()
    thread.join(timeout=10)
    assert errors == [] and state.stop
    state.reader.close()
