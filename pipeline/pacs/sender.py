"""C-STORE SCU: send result files (DICOM SEG, SR) to the destination PACS with pynetdicom.

TCP_NODELAY is set on the association's socket as soon as it connects (an ``EVT_CONN_OPEN``
handler runs after ``connect()`` and before the A-ASSOCIATE-RQ is written): without it Nagle's
algorithm and delayed ACKs stall each small DIMSE message by ~40 ms.
"""

from __future__ import annotations

import logging
import socket
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pynetdicom import AE, evt
from pynetdicom.presentation import build_context
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from pipeline.logs import anon
from pipeline.pacs.config import Destination

log = logging.getLogger("osteoplan.pacs.sender")


def set_nodelay(event: evt.Event) -> None:
    """``EVT_CONN_OPEN`` handler: disable Nagle on the association's TCP socket."""
    sock = getattr(getattr(event.assoc.dul, "socket", None), "socket", None)
    if sock is not None:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError as exc:  # e.g. a non-TCP socket in tests
            log.debug("TCP_NODELAY not set: %s", exc)


@dataclass
class SendResult:
    path: Path
    ok: bool
    detail: str  # status in hex, or the error


def send_files(destination: Destination, paths: list[Path], calling_ae: str,
               acse_timeout_s: float = 30.0, dimse_timeout_s: float = 60.0,
               network_timeout_s: float = 60.0) -> list[SendResult]:
    """Send ``paths`` over one association. Never raises for network/peer trouble: each file gets
    a SendResult (ok=False with the reason when the association failed or the peer refused)."""
    datasets = []
    results: list[SendResult] = []
    for p in paths:
        try:
            datasets.append((p, pydicom.dcmread(p)))
        except Exception as exc:  # noqa: BLE001 - a result file we cannot read is reported, not raised
            results.append(SendResult(p, False, f"unreadable result file: {type(exc).__name__}"))
    if not datasets:
        return results

    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = acse_timeout_s
    ae.dimse_timeout = dimse_timeout_s
    ae.network_timeout = network_timeout_s
    ae.connection_timeout = min(network_timeout_s, 10.0)
    contexts = {}
    for _, ds in datasets:
        sop_class = str(ds.SOPClassUID)
        ts = str(ds.file_meta.TransferSyntaxUID)
        syntaxes = contexts.setdefault(sop_class, [])
        for t in (ts, ExplicitVRLittleEndian, ImplicitVRLittleEndian):
            if t not in syntaxes:
                syntaxes.append(t)
    ae.requested_contexts = [build_context(c, ts) for c, ts in contexts.items()]

    assoc = ae.associate(destination.host, destination.port, ae_title=destination.ae_title,
                         evt_handlers=[(evt.EVT_CONN_OPEN, set_nodelay)])
    if not assoc.is_established:
        why = "association rejected" if assoc.is_rejected else "association aborted" if assoc.is_aborted \
            else "cannot connect"
        results += [SendResult(p, False, f"{why} ({destination})") for p, _ in datasets]
        return results
    try:
        for p, ds in datasets:
            try:
                status = assoc.send_c_store(ds)
            except Exception as exc:  # noqa: BLE001 - e.g. no accepted context for this class
                results.append(SendResult(p, False, f"{type(exc).__name__}: {exc}"))
                continue
            code = getattr(status, "Status", None)
            if code is None:
                results.append(SendResult(p, False, "no response (timeout or connection lost)"))
            elif code == 0x0000 or (code & 0xF000) == 0xB000:  # success or warning: stored
                results.append(SendResult(p, True, f"0x{code:04X}"))
                log.info("sent %s to %s (status 0x%04X)", anon(str(ds.SOPInstanceUID)), destination.ae_title, code)
            else:
                results.append(SendResult(p, False, f"refused with status 0x{code:04X}"))
    finally:
        if assoc.is_established:
            assoc.release()
    return results
