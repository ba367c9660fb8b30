"""PACS-triggered jobs: DICOM listener (C-STORE SCP), durable spool + job queue, result sender."""
