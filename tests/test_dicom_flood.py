"""One host cannot block DICOM reception for everyone else (issue 9, denial of service).

The contract: 150 TCP connections from 127.0.0.2 that each send one byte and are
renewed as soon as they are closed, while dcmtk ``storescu`` from 127.0.0.1 keeps
storing: every storescu run succeeds. The refusals are logged a few times, not 150,
and audited as rejected associations.
"""

from __future__ import annotations

import json
import select
import socket
import sqlite3
import threading
from pathlib import Path

from tests.support import require_peers
from tests.support.router import RouterProcess
from tests.support.synth import make_small_study

ATTACKER = "127.0.0.2"
CONNECTIONS = 150


class OneByteFlood(threading.Thread):
    """Keeps ``CONNECTIONS`` connections from ``ATTACKER`` open, each having sent one
    byte of an A-ASSOCIATE-RQ; a connection the router closes is opened again."""

    def __init__(self, port: int):
        super().__init__(name="flood", daemon=True)
        self.port = port
        self.stop = threading.Event()
        self.opened = 0
        self.socks: list[socket.socket] = []

    def _open(self) -> socket.socket | None:
        try:
            sock = socket.create_connection(
                ("127.0.0.1", self.port), timeout=2, source_address=(ATTACKER, 0)
            )
            sock.sendall(b"\x01")
        except OSError:
            return None
        self.opened += 1
        return sock

    def run(self) -> None:
        self.socks = [s for s in (self._open() for _ in range(CONNECTIONS)) if s]
        while not self.stop.wait(0.2):
            readable, _, _ = select.select(self.socks, [], [], 0)
            for sock in readable:  # closed by the router (or ARTIM): renew it
                sock.close()
                self.socks.remove(sock)
            while len(self.socks) < CONNECTIONS and not self.stop.is_set():
                sock = self._open()
                if sock is None:
                    break
                self.socks.append(sock)
        for sock in self.socks:
            sock.close()


def test_a_one_byte_flood_from_one_address_does_not_stop_other_senders(tmp_path: Path) -> None:
    require_peers()
    files = make_small_study(tmp_path / "study", 3)
    with RouterProcess(tmp_path / "router", {}) as router:
        flood = OneByteFlood(router.port)
        flood.start()
        try:
            # The flood is in place before the modality starts, and renewed throughout.
            while flood.opened < CONNECTIONS and flood.is_alive():
                flood.stop.wait(0.1)
            results = [router.send(files, calling=f"CT{run}") for run in range(6)]
        finally:
            flood.stop.set()
            flood.join(30)
        log = router.log()
        index = router.storage / "index.sqlite"
    for run, result in enumerate(results):
        assert result.returncode == 0, f"storescu run {run} failed:\n{result.stderr}\n{log[-3000:]}"
    assert flood.opened > CONNECTIONS  # the router did close (and the flood renewed) some
    refusal_lines = [line for line in log.splitlines() if "refused" in line and ATTACKER in line]
    assert 1 <= len(refusal_lines) <= 3, refusal_lines
    assert "dicom.max_associations_per_host" in refusal_lines[0]
    with sqlite3.connect(f"file:{index}?mode=ro", uri=True) as conn:
        rows = conn.execute(
            "SELECT detail FROM audit_log WHERE action = 'dicom.association.rejected' "
            "AND source = ?",
            (ATTACKER,),
        ).fetchall()
    assert rows, "the refusals were not audited"
    assert "dicom.max_associations_per_host" in json.loads(rows[0][0])["reason"]
