"""One data-parallel replica: a process running an engine, driven over a pipe by the front.

Messages from the front: ("submit", call, batch, stream), ("abort", call), ("abort_rid", rid),
("call", reply, method, args) for the engine's other methods, ("stop",). To the front:
("ready", info) or ("failed", message) once; ("accepted", call, num_outputs) or
("rejected", call, message) per submit; ("output", call, index, output); ("reply", reply,
ok, value). When the front goes away (the pipe closes), the replica shuts its engine down and
exits: no replica outlives its front.
"""

from __future__ import annotations

import logging
import threading
from multiprocessing.connection import Connection
from typing import Any

from sglbatch.engine.api_types import GenerateOutput
from sglbatch.engine.client import Submission
from sglbatch.engine.errors import EngineError

logger = logging.getLogger(__name__)

# What the front may call on a replica's engine through ("call", ...).
CALLABLE = ("flush_cache", "load", "stats", "start_profile", "stop_profile", "abort_all")


def replica_main(engine_cls: type, kwargs: dict[str, Any], conn: Connection) -> None:
    """The replica process. `engine_cls` is passed in (the front does not import the
    engine module it is created from)."""
    try:
        engine = engine_cls(**kwargs)
    except BaseException as e:  # reported to the front, which raises it
        conn.send(("failed", f"{type(e).__name__}: {e}"))
        return
    relay = _Relay(engine, conn)
    conn.send(("ready", engine.info))
    try:
        relay.serve()
    finally:
        engine.shutdown()


class _Relay:
    def __init__(self, engine: Any, conn: Connection):
        self.engine = engine
        self.conn = conn
        self._send_lock = threading.Lock()  # the engine thread and this one both send
        self._calls: dict[int, tuple[Submission, list[int]]] = {}  # call -> (started, left)
        self._calls_lock = threading.Lock()

    def send(self, message: tuple) -> None:
        with self._send_lock:
            try:
                self.conn.send(message)
            except (BrokenPipeError, EOFError, OSError):  # the front is gone; serve() ends
                pass

    def serve(self) -> None:
        while True:
            try:
                message = self.conn.recv()
            except (EOFError, OSError):
                logger.warning("the front went away; this replica stops")
                return
            match message:
                case ("stop",):
                    return
                case ("submit", call, batch, stream):
                    self._submit(call, batch, stream)
                case ("abort", call):
                    with self._calls_lock:
                        entry = self._calls.get(call)
                    if entry is not None:
                        entry[0].abort()
                case ("abort_rid", rid):
                    self.engine.abort(rid)
                case ("call", reply, method, args):
                    self._call(reply, method, args)

    def _submit(self, call: int, batch: Any, stream: bool) -> None:
        def sink(index: int, out: GenerateOutput) -> None:
            self.send(("output", call, index, out))
            if out.finish_reason is not None:
                self._finished(call)

        try:
            with self._calls_lock:  # outputs may come before _calls has the entry
                started = self.engine.submit(batch, sink, stream)
                self._calls[call] = (started, [started.num_outputs])
        except (ValueError, EngineError) as e:
            self.send(("rejected", call, type(e).__name__, str(e)))
            return
        self.send(("accepted", call, started.num_outputs))

    def _finished(self, call: int) -> None:
        with self._calls_lock:
            entry = self._calls.get(call)
            if entry is None:
                return
            entry[1][0] -= 1
            if entry[1][0] == 0:
                del self._calls[call]

    def _call(self, reply: int, method: str, args: tuple) -> None:
        try:
            if method not in CALLABLE:
                raise ValueError(f"a replica does not take {method!r}")
            if method == "stats":
                value = self.engine.stats.snapshot()
            else:
                value = getattr(self.engine, method)(*args)
            self.send(("reply", reply, True, value))
        except Exception as e:  # the front re-raises it in its caller
            self.send(("reply", reply, False, e))
