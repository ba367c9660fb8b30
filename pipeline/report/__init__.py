"""Outputs: report.json, lesions.csv, segmentation.nii.gz, DICOM SEG, DICOM SR (TID 1500), HTML."""
