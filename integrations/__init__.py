"""Framework adapters, installed as ``gradwatch.integrations``.

Each adapter maps its framework's "gradients are final" moment onto
:meth:`gradwatch.GradMonitor.step` and holds no statistics of its own.
"""
