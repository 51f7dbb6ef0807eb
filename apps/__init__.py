"""The apps, top layer: the ``cxr`` command (``apps.cli``) and one module per subcommand
(node, worker, run = the supervisor, send, demo, train/evaluate/predict/export-onnx, audit,
db). They drive the stages (``dicom_node``, ``worker``), ``db`` and ``ml``; nothing below
imports them. The web console is an app package of its own (``web``).

Research use only, not for diagnostic use.
"""
