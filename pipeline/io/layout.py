"""Read a header by reusing the layout of an earlier file of the same series: same result, ~5x faster.

The files of one series come from one writer: their headers hold the same elements in the same
order, and most of them with the same bytes. Only a few elements vary from slice to slice (the
SOP instance UID, ImagePositionPatient, InstanceNumber, SliceLocation, times...). Once the fast
reader (:mod:`pipeline.io.fastheader`) has walked a file element by element, a :class:`Layout`
keeps where each top-level element starts and ends, and which ones vary. The next file is then
read by comparing each run of non-varying elements with the earlier file's bytes in one
comparison, and by reading only the varying elements' headers and values.

Exactness: the walk decides everything (element boundaries, the checks that send a file to
pydicom, which values are kept) from the bytes it reads and from the previous element's tag. A
run of whole elements whose bytes equal the earlier file's, after a varying element with the
same tag (and VR), is walked exactly as it was in the earlier file: the same decisions, the same
kept values, only shifted. A varying element must have the same tag (and VR bytes) and a defined,
even length, within the first bytes read. Varying elements are never those the walk checks by
value (the transfer syntax, the character set, the first element of the data set). Anything
else (a run that differs, a length that is odd or undefined, a header past the first bytes, no
pixel data after the last element) returns None and the caller walks the file in full, then
teaches :class:`LayoutMemo` what varied.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any, Callable

from pipeline.io.fastheader import (_HEADER_SIZE, CHARSET_TAG, PIXEL_TAGS, TRANSFER_SYNTAX_TAG,
                                    RawHeader)

MAX_LAYOUTS = 4  # series interleaved in one folder (a CT, its localizer, another reconstruction...)
MAX_LEARNED_WITHOUT_USE = 8  # files walked in full in a row before the memo stops learning (no gain)
MAX_HEADER_BYTES = 1 << 20  # a layout covers at most this much of a file (pixel data element included)
HEAD_SLACK = 4096  # read this much past a layout's header: varying values may be longer in other files
_U16 = struct.Struct("<H").unpack_from
_U32 = struct.Struct("<I").unpack_from


@dataclass(frozen=True)
class _Varies:
    """A varying element, after the run of bytes that must be found before it as they are."""

    run: bytes  # the non-varying elements before it (or b"")
    prefix: bytes  # its tag (4 bytes), then its VR (2 bytes) in explicit VR
    header: int  # 8 or 12 bytes before the value
    length_at: int  # where the length is in the element header
    unpack: Callable[[bytes, int], tuple[int]]  # reads the 2- or 4-byte length
    tag: int
    vr: str | None  # the VR kept with a wanted value (None in implicit VR)
    wanted: bool


class Layout:
    """One file's top-level element layout, and which elements vary across its series."""

    def __init__(self, head: bytes, bounds: list[int], n_meta: int, raw: RawHeader,
                 wanted: frozenset[int], varying: frozenset[int]) -> None:
        """``bounds``: every element's start, then where the last one ends (the pixel data);
        elements ``[0, n_meta)`` are the file meta group (explicit VR)."""
        self.head, self.bounds, self.n_meta = head, bounds, n_meta
        self.implicit, self.transfer_syntax, self.wanted = raw.implicit, raw.transfer_syntax, wanted
        self.varying = varying
        self.view_cache: Any = None  # the caller's decoded values of the kept non-varying elements
        self.slice_cache: Any = None  # the caller's fields of the first image read by this layout
        self.stable: dict[int, tuple[str | None, bytes]] = {}  # kept values from non-varying elements
        self.ops: list[_Varies] = []
        self.tail = b""  # the run after the last varying element, then the pixel data's tag
        self.varying_tags: tuple[int, ...] = ()
        self.pixel_tag = head[bounds[-1]:bounds[-1] + 4]
        self.usable = self._plan(raw)

    def n_elements(self) -> int:
        return len(self.bounds) - 1

    def element(self, i: int) -> bytes:
        return self.head[self.bounds[i]:self.bounds[i + 1]]

    def prefix(self, i: int) -> bytes:
        """What identifies element i: its tag, and its VR bytes in explicit VR."""
        implicit = self.implicit and i >= self.n_meta
        start = self.bounds[i]
        return self.head[start:start + (4 if implicit else 6)]

    def tag(self, i: int) -> int:
        group, elem = struct.unpack_from("<HH", self.head, self.bounds[i])
        return group << 16 | elem

    def _plan(self, raw: RawHeader) -> bool:
        """The ops that read another file of this layout; False when this layout cannot be reused."""
        if self.n_meta >= self.n_elements():
            return False  # no data set element: the walk checks the bytes where it would start
        varying_tags = []
        run_start = 132
        for i in range(self.n_elements()):
            if i not in self.varying:
                continue
            tag = self.tag(i)
            if tag in (TRANSFER_SYNTAX_TAG, CHARSET_TAG) or i == self.n_meta:
                return False  # checked by value by the walk: never taken from a varying element
            op = self._varies(i, tag, self.head[run_start:self.bounds[i]])
            if op is None:
                return False
            self.ops.append(op)
            run_start = self.bounds[i + 1]
            if op.wanted:
                varying_tags.append(tag)
        self.tail = self.head[run_start:self.bounds[-1]] + self.head[self.bounds[-1]:self.bounds[-1] + 4]
        self.varying_tags = tuple(varying_tags)
        self.stable = {t: v for t, v in raw.elements.items() if t not in self.varying_tags}
        return True

    def _varies(self, i: int, tag: int, run: bytes) -> _Varies | None:
        start, end = self.bounds[i], self.bounds[i + 1]
        if self.implicit and i >= self.n_meta:
            length = _U32(self.head, start + 4)[0]
            op = _Varies(run, self.prefix(i), 8, 4, _U32, tag, None, tag in self.wanted)
        else:
            raw_vr = self.head[start + 4:start + 6]
            header = _HEADER_SIZE.get(raw_vr, 0)
            if not header:
                return None
            long = header == 12
            length = (_U32 if long else _U16)(self.head, start + (8 if long else 6))[0]
            op = _Varies(run, self.prefix(i), header, 8 if long else 6, _U32 if long else _U16, tag,
                         raw_vr.decode("ascii"), i >= self.n_meta and tag in self.wanted)
        if start + op.header + length != end:  # an undefined length (a sequence): not reused
            return None
        return op

    def raw_header(self, head: bytes, varying: dict[int, tuple[str | None, bytes]], pos: int) -> RawHeader:
        """The RawHeader of a file this layout matched (``read_varying``'s result)."""
        found = dict(self.stable)
        found.update(varying)
        return RawHeader(found, self.implicit, self.transfer_syntax, pos, head[pos:pos + 12], self)

    def read_varying(self, head: bytes) -> tuple[dict[int, tuple[str | None, bytes]], int] | None:
        """(the wanted varying elements, where the pixel data element starts) when the file
        follows this layout exactly, else None. The other kept elements are ``stable``'s."""
        if not head.startswith(b"DICM", 128):
            return None
        found: dict[int, tuple[str | None, bytes]] = {}
        pos = 132
        limit = len(head)
        for op in self.ops:
            if not head.startswith(op.run, pos):
                return None
            pos += len(op.run)
            if not head.startswith(op.prefix, pos) or pos + op.header > limit:
                return None
            length = op.unpack(head, pos + op.length_at)[0]
            start = pos + op.header
            pos = start + length
            if length & 1 or pos > limit:  # odd, undefined (0xFFFFFFFF), or past the bytes read
                return None
            if op.wanted:
                found[op.tag] = (op.vr, head[start:pos])
        if not head.startswith(self.tail, pos):  # the last run, then the pixel data's tag
            return None
        pos += len(self.tail) - 4
        if pos + 12 > limit:
            return None
        return found, pos


class LayoutMemo:
    """The layouts of the last few series met in one header pass, most recently used first."""

    def __init__(self) -> None:
        self.layouts: list[Layout] = []
        self.learned = 0  # layouts learned since one was last of use: past a few, stop learning

    @property
    def learning(self) -> bool:
        """False once MAX_LEARNED_WITHOUT_USE layouts in a row were of no use (learn() does nothing)."""
        return self.learned <= MAX_LEARNED_WITHOUT_USE

    def head_bytes(self) -> int:
        """How many first bytes of a file the known layouts need (0: none known). Headers longer
        than the first read (Philips: ~50 KB of private elements) are read this far first."""
        return max((layout.bounds[-1] + 12 for layout in self.layouts), default=-HEAD_SLACK) + HEAD_SLACK

    def read(self, head: bytes, wanted: frozenset[int]) -> RawHeader | None:
        """This file's header by the layout it follows, or None when it follows none."""
        match = self.match(head, wanted)
        return None if match is None else match[0].raw_header(head, match[1], match[2])

    def match(self, head: bytes, wanted: frozenset[int]
              ) -> tuple[Layout, dict[int, tuple[str | None, bytes]], int] | None:
        """(the layout this file follows, its ``read_varying`` result), or None. That layout goes
        first, and learning goes on."""
        for k, layout in enumerate(self.layouts):
            if layout.wanted is not wanted:
                continue
            got = layout.read_varying(head)
            if got is not None:
                self.learned = 0
                if k:
                    self.layouts.insert(0, self.layouts.pop(k))
                return layout, got[0], got[1]
        return None

    def learn(self, head: bytes, trace: list[int], raw: RawHeader, wanted: frozenset[int]) -> None:
        """A file the fast reader walked in full (``trace`` from ``read_raw_header``): keep its layout,
        with the elements that differ from an earlier layout of the same structure marked varying."""
        if not self.learning or -1 not in trace or raw.pixel_pos + 12 > min(len(head), MAX_HEADER_BYTES):
            return
        group, elem = struct.unpack_from("<HH", head, raw.pixel_pos)
        if group << 16 | elem not in PIXEL_TAGS:
            return
        self.learned += 1
        n_meta = trace.index(-1)
        bounds = [p for p in trace if p >= 0] + [raw.pixel_pos]
        new = Layout(head, bounds, n_meta, raw, wanted, frozenset())
        for k, old in enumerate(self.layouts):
            if not _same_structure(old, new):
                continue
            varying = old.varying | {i for i in range(new.n_elements()) if old.element(i) != new.element(i)}
            self.layouts.pop(k)
            new = Layout(head, bounds, n_meta, raw, wanted, frozenset(varying))
            break
        if new.usable:
            self.layouts.insert(0, new)
            del self.layouts[MAX_LAYOUTS:]


def _same_structure(a: Layout, b: Layout) -> bool:
    """The same elements in the same order (tags, and VRs where explicit), the same encoding."""
    if (a.n_meta, a.n_elements(), a.implicit, a.transfer_syntax, a.wanted) != \
            (b.n_meta, b.n_elements(), b.implicit, b.transfer_syntax, b.wanted) or a.pixel_tag != b.pixel_tag:
        return False
    return all(a.prefix(i) == b.prefix(i) for i in range(a.n_elements()))
