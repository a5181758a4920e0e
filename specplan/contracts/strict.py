"""The base of every JSON contract: unknown fields are refused, values are frozen, files are read strictly.

Files are validated in pydantic's strict JSON mode (``specplan.jsonio.load``): ``"decode_batch": "16"`` is refused
rather than turned into 16, while JSON arrays fill tuple fields and integers fill float fields. Objects built in code
validate as usual.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
