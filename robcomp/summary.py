"""What ``compress`` did, layer by layer: the records every layer of robcomp can read and write.

These plain dataclasses sit at the bottom of the import graph (they import nothing from robcomp), so
the compression handlers, ``robcomp.save``/``load`` and the evaluation record share them without
importing ``compress``.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field

__all__ = ["LayerReport", "CompressionSummary"]


@dataclass
class LayerReport:
    name: str
    recipe: str
    action: str  # "compressed", "pruned" or "skipped"
    before_shape: tuple
    after_shape: tuple
    before_bytes: int
    after_bytes: int
    backend: str = ""
    reason: str = ""
    before_type: str = ""  # the layer's class before and after, e.g. "Conv1D" -> "Int8WeightOnlyLinear"
    after_type: str = ""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class CompressionSummary:
    layers: list[LayerReport] = field(default_factory=list)
    recipes: list[dict] = field(default_factory=list)
    bytes_before: int = 0
    bytes_after: int = 0
    notes: list[str] = field(default_factory=list)  # what compress adjusted (e.g. round_to for later recipes)

    def to_dict(self) -> dict:
        return {"recipes": self.recipes, "bytes_before": self.bytes_before, "bytes_after": self.bytes_after,
                "notes": list(self.notes),
                "layers": [layer.to_dict() for layer in self.layers]}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, d: dict) -> "CompressionSummary":
        layers = [LayerReport(**{**r, "before_shape": tuple(r["before_shape"]), "after_shape": tuple(r["after_shape"])})
                  for r in d.get("layers", [])]
        return cls(layers=layers, recipes=list(d.get("recipes", [])), bytes_before=int(d.get("bytes_before", 0)),
                   bytes_after=int(d.get("bytes_after", 0)), notes=list(d.get("notes", [])))

    @classmethod
    def from_json(cls, text: str) -> "CompressionSummary":
        return cls.from_dict(json.loads(text))

    def __str__(self) -> str:
        head = ("layer", "recipe", "action", "type", "shape before", "shape after", "bytes before", "bytes after",
                "note")
        rows = [head] + [(r.name, r.recipe, r.action,
                          f"{r.before_type} -> {r.after_type}" if r.after_type != r.before_type else r.before_type,
                          "x".join(map(str, r.before_shape)),
                          "x".join(map(str, r.after_shape)), str(r.before_bytes), str(r.after_bytes),
                          r.reason or r.backend) for r in self.layers]
        widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        ratio = self.bytes_before / self.bytes_after if self.bytes_after else float("nan")
        lines.append(f"model bytes: {self.bytes_before} -> {self.bytes_after} ({ratio:.2f}x smaller)")
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)
