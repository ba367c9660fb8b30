"""Ingestion: find DICOM series, pick the CT series, load a Volume (HU + exact LPS geometry); NIfTI in/out.

Entry points: :func:`pipeline.io.load.load_input` (a folder, a DICOM file, a NIfTI file or a zip)
and :func:`pipeline.io.load.load_dicom_files` (an explicit file list). Modules, one job each:

- ``discover``   walk the input, read every header once (no pixel data), skip junk files
- ``select``     split series into stacks, rank the CT stacks, say why the others were passed over
- ``geometry``   pure functions: slice normal, sorting, duplicate positions, gaps, tilt
- ``pixels``     decode pixel data straight into one preallocated array (thread pool)
- ``dicom``      build the Volume from the chosen stack (dedupe, tilt correction, gap filling)
- ``nifti``      NIfTI (RAS) <-> Volume (LPS); label map and volume writers
- ``zipin``      safe zip extraction (zip-slip and zip-bomb guards)
- ``dicom_write`` write CT series (phantoms, tests) and a localizer

The rules each module applies are in its docstring; README's "Input" section copies them.
"""

from __future__ import annotations

import pydicom

# Real scanners write private tags whose length does not fit their VR (e.g. the Philips chest CT
# in the test data); read such elements as UN instead of failing the whole header.
pydicom.config.convert_wrong_length_to_UN = True
