"""Frees the Triton sequence slot of a refused START.

Triton 2.51's sequence batcher holds a slot for a correlation id from its START until a
request with END is dispatched (or the id idles out, 600 s here), whether or not the model
accepted the START; refused STARTs that are never followed by END would use up the slots and
stall every new conversation (issue 13 item 4, docs/security.md).

Rules:
- The engine decides, in submission order, which refusals free a slot: the first output of
  a START without END that is a final error, unless the id is a live conversation (a START
  on a live conversation is refused, and that conversation must go on). It marks that output
  ``release_slot`` (engine/requests.py); no thread here reads the engine's state.
- The marked error is held back; a helper thread sends END for the id to this model through
  BLS (the engine answers "not live", which is ignored) and only then sends the held error:
  a client that retries the same id after seeing the error cannot have its new conversation
  ended by our END.
- BLS runs on helper threads, never inside ``execute`` (``exec`` waits for a response that
  cannot come before ``execute`` returns).
"""

from __future__ import annotations

import logging
import queue
import threading

log = logging.getLogger("tritonkv.server")

FLAG_END = 2  # TRITONSERVER_REQUEST_FLAG_SEQUENCE_END
RELEASE_THREADS = 4


class SlotReleaser:
    def __init__(self, pb_utils, model_name: str):
        self.pb_utils = pb_utils
        self.model_name = model_name
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self.released = 0
        for i in range(RELEASE_THREADS):
            threading.Thread(target=self._loop, name=f"tritonkv-slot-release-{i}", daemon=True).start()

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
