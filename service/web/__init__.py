"""The web layer: HTTP routes (``/v1``, DICOMweb, health), the web pages, multipart parsing, and errors as
problem+json or HTML pages.  It imports the core (:mod:`service.intake`, :mod:`service.dicom_node`, …) and the
store; nothing below imports it."""
