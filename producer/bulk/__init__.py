"""Bulk runs: pair files (:mod:`.pairs`), the windowed, resumable run (:mod:`.run`, :mod:`.jobs`), its output and
evaluation (:mod:`.output`, :mod:`.evaluation`), and bulk enrollment from a folder (:mod:`.enroll`)."""
