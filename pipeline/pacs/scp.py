"""Storage SCP (pynetdicom): C-ECHO and C-STORE into the spool.

* Presentation contexts: Verification + the configured storage SOP classes, any transfer syntax
  pynetdicom knows (instances are stored as sent). Other SOP classes are not accepted in the
  A-ASSOCIATE-AC, which is how DICOM says "not supported" politely.
* Calling AE allow-list (``require_calling_aet``: others get A-ASSOCIATE-RJ "calling AE title not
  recognised") and ``maximum_associations`` (over the limit: A-ASSOCIATE-RJ, transient).
* Received data is streamed to ``SPOOL/tmp`` (pynetdicom's ``STORE_RECV_CHUNKED_DATASET``), never
  held whole in memory; the handler checks size and free space, reads the header, fsyncs and
  renames into ``incoming/`` and only then returns 0x0000.
"""

from __future__ import annotations

import logging
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Callable

import pydicom
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, _config, evt
from pynetdicom.sop_class import Verification

from pipeline.logs import anon
from pipeline.pacs.config import PacsConfig
from pipeline.pacs.sender import set_nodelay
from pipeline.pacs.spool import Spool

log = logging.getLogger("osteoplan.pacs.scp")

STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700  # Refused: Out of Resources
STATUS_CANNOT_UNDERSTAND = 0xC210  # Error: Cannot understand (our "bad instance" code)
STATUS_PROCESSING_FAILURE = 0x0110  # Processing failure (could not store)

_HEADER_TAGS = ["StudyInstanceUID", "SOPInstanceUID", "SOPClassUID", "Modality"]


class StoreHandler:
    """The ``EVT_C_STORE`` handler. ``on_stored(study_uid)`` is called after each success."""

    def __init__(self, spool: Spool, cfg: PacsConfig, on_stored: Callable[[str], None] | None = None) -> None:
        self.spool = spool
        self.max_bytes = int(cfg.max_instance_mb * 1024 * 1024)
        self.min_free = int(cfg.min_free_mb * 1024 * 1024)
        self.on_stored = on_stored

    def closed(self, event: evt.Event) -> None:
        """``EVT_CONN_CLOSE``: the association ended (released, aborted or dropped)."""
        self.spool.association_closed(id(event.assoc))

    def __call__(self, event: evt.Event) -> int:
        path = Path(event.dataset_path)
        req_sop = str(event.request.AffectedSOPInstanceUID or "")
        size = path.stat().st_size
        if size > self.max_bytes:
            log.warning("refused instance %s: %d bytes > limit %d", anon(req_sop), size, self.max_bytes)
            path.unlink(missing_ok=True)
            return STATUS_OUT_OF_RESOURCES
        if shutil.disk_usage(self.spool.root).free < self.min_free:
            log.error("refused instance %s: spool disk has less than %d MB free", anon(req_sop),
                      self.min_free // (1024 * 1024))
            path.unlink(missing_ok=True)
            return STATUS_OUT_OF_RESOURCES
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=_HEADER_TAGS)
            study_uid = str(ds.StudyInstanceUID).strip()
            sop_uid = str(ds.get("SOPInstanceUID", req_sop) or req_sop).strip()
            if not study_uid or not sop_uid:
                raise ValueError("StudyInstanceUID or SOPInstanceUID missing")
        except Exception as exc:  # noqa: BLE001 - a header we cannot read: refuse, keep a copy
            reason = f"instance refused: header unreadable ({type(exc).__name__}: {str(exc)[:200]})"
            kept = self.spool.reject(path, req_sop or "unknown", reason)
            log.warning("refused instance %s: %s; kept as %s", anon(req_sop), type(exc).__name__, kept.name)
            return STATUS_CANNOT_UNDERSTAND
        try:
            self.spool.store_instance(path, study_uid, sop_uid, id(event.assoc))
        except OSError as exc:
            log.error("could not store instance %s: %s", anon(sop_uid), exc)
            return STATUS_OUT_OF_RESOURCES
        if self.on_stored is not None:
            self.on_stored(study_uid)
        return STATUS_SUCCESS


def build_ae(cfg: PacsConfig) -> AE:
    """The listener's application entity with its contexts and limits."""
    ae = AE(ae_title=cfg.ae_title)
    ae.maximum_associations = cfg.max_associations
    ae.acse_timeout = cfg.acse_timeout_s
    ae.dimse_timeout = cfg.dimse_timeout_s
    ae.network_timeout = cfg.network_timeout_s
    ae.maximum_pdu_size = 262144
    if cfg.allow_ae:
        ae.require_calling_aet = list(cfg.allow_ae)
    ae.add_supported_context(Verification)
    for uid in cfg.storage_uids():
        ae.add_supported_context(uid, ALL_TRANSFER_SYNTAXES)
    return ae


def _log_assoc(event: evt.Event) -> None:
    req = event.assoc.requestor
    log.info("association from %s (%s)", req.ae_title, req.address)


def _log_rejected(event: evt.Event) -> None:
    req = event.assoc.requestor
    log.warning("association from %s (%s) rejected", req.ae_title, req.address)


def start_scp(cfg: PacsConfig, spool: Spool, on_stored: Callable[[str], None] | None = None):
    """Start the SCP in the background; returns pynetdicom's AssociationServer (``.shutdown()``).

    Side effects on this process: pynetdicom streams C-STORE data to files
    (``_config.STORE_RECV_CHUNKED_DATASET``) and Python's temp folder becomes ``SPOOL/tmp`` so
    those files land on the spool's file system (a rename, not a copy, moves them into place).
    """
    _config.STORE_RECV_CHUNKED_DATASET = True
    tempfile.tempdir = str(spool.tmp)
    ae = build_ae(cfg)
    store = StoreHandler(spool, cfg, on_stored)
    handlers = [
        (evt.EVT_C_STORE, store),
        (evt.EVT_CONN_CLOSE, store.closed),
        (evt.EVT_CONN_OPEN, set_nodelay),
        (evt.EVT_ACCEPTED, _log_assoc),
        (evt.EVT_REJECTED, _log_rejected),
    ]
    server = ae.start_server((cfg.bind_address, cfg.port), block=False, evt_handlers=handlers)
    if server.socket is not None:
        server.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return server
