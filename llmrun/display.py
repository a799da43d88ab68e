"""Rich renderers (tables, live tokens, progress): the only module that uses Rich."""

from __future__ import annotations
