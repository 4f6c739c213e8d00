"""Serving a finished run over HTTP (`multitune serve`): one backbone, every task, one endpoint."""
