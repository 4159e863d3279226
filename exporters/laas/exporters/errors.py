"""The exporters' errors: part of laas' one hierarchy (laas.core.errors), never sent over gRPC.

    LaasError
    └── ExportError             a source cannot be exported, evaluated or registered
        ├── MissingExtra        a heavy dependency is not installed; the message names the extra
        └── QualityGateFailed   a quantized model lost more than the threshold allows (not registered)
"""

from __future__ import annotations

from laas.core.errors import LaasError


class ExportError(LaasError):
    pass


class MissingExtra(ExportError):
    pass


class QualityGateFailed(ExportError):
    pass
