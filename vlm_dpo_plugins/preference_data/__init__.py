"""Preference files read and their rows checked, the same way for every reader.

``vlm-dpo doctor``, the file checks the LLaMA-Factory and ms-swift adapters run before their
framework reads a file (``collation/file_checks.py``), the live collation checks and the
``vlm-dpo train --data`` loader all read rows with ``rows.read_rows`` and check images with
``images``, so a broken line or image means the same thing to each of them. Framework-free:
Pillow is imported only when an image is opened.
"""
