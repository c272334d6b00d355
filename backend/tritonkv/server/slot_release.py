"""Frees the Triton sequence slot of a refused START.

Triton 2.51's sequence batcher holds a slot for a correlation id from its START until a
request with END is dispatched (or the id idles out, 600 s here), whether or not the model
accepted the START; refused STARTs that are never followed by END would use up the slots and
stall every new conversation (issue 13 item 4, docs/security.md).

Rules:
- Only a START without END, on an id that is not a live conversation of this instance, is
  watched (a START on a live conversation is refused, and that conversation must go on).
- If its first response is a final error, the error is held back; a helper thread sends END
  for the id to this model through BLS (the engine answers "not live", which is ignored) and
  only then sends the held error: a client that retries the same id after seeing the error
  cannot have its new conversation ended by our END.
- BLS runs on helper threads, never inside ``execute`` (``exec`` waits for a response that
  cannot come before ``execute`` returns).
"""

from __future__ import annotations

import logging
import queue
import threading

log = logging.getLogger("tritonkv.server")

FLAG_START, FLAG_END = 1, 2  # TRITONSERVER_REQUEST_FLAG_SEQUENCE_START / _END
RELEASE_THREADS = 4


class _HoldFirstError:
    """A response sender whose first response, if it is a final error, waits for the release."""

    def __init__(self, sender, corr_id, releaser: "SlotReleaser", final_flag: int):
        self._sender = sender
        self._corr_id = corr_id
        self._releaser = releaser
        self._final = final_flag
        self._first = True

    def send(self, response=None, flags=0):
        first, self._first = self._first, False
        if first and response is not None and response.has_error() and flags & self._final:
            self._releaser.release(self._corr_id, lambda: self._sender.send(response, flags=flags))
            return
        self._sender.send(response, flags=flags)


class SlotReleaser:
    def __init__(self, pb_utils, model_name: str):
        self.pb_utils = pb_utils
        self.model_name = model_name
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self.released = 0
        for i in range(RELEASE_THREADS):
            threading.Thread(target=self._loop, name=f"tritonkv-slot-release-{i}", daemon=True).start()

    def watch(self, request, sender, live_ids):
        """The sender to answer ``request`` with (wrapped when its slot may need a release)."""
        try:
            flags = request.flags()
            corr_id = request.correlation_id()
        except Exception:  # admission answers a broken request; nothing to watch
            return sender
        if not flags & FLAG_START or flags & FLAG_END or corr_id in (0, "") or corr_id in live_ids:
            return sender
        return _HoldFirstError(sender, corr_id, self, self.pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)

    def release(self, corr_id, answer) -> None:
        self._jobs.put((corr_id, answer))

    def _loop(self) -> None:
        while True:
            corr_id, answer = self._jobs.get()
            try:
                end = self.pb_utils.InferenceRequest(model_name=self.model_name, inputs=[],
                                                     requested_output_names=[], correlation_id=corr_id,
                                                     flags=FLAG_END)
                for _ in end.exec(decoupled=True):
                    pass  # "not live": the engine never opened it
                self.released += 1
            except Exception:  # the error still goes out; the slot then idles out
                log.exception("could not send END to free the sequence slot of a refused START")
            finally:
                try:
                    answer()
                except Exception:
                    log.exception("could not answer a refused START")
