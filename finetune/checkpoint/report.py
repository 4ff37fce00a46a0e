"""The load report: every model key in exactly one of loaded / missing / mismatched."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class Mismatch:
    key: str
    model_shape: list[int]
    checkpoint_shape: list[int]
    action: str  # skipped | adapted
    detail: str = ""
    rule: str = "checkpoint.on_shape_mismatch"  # or the checkpoint.shape_overrides[i] entry / model.add op that decided


@dataclass
class RemapSuggestion:
    pattern: str
    replace: str
    keys: int  # how many more checkpoint keys land on a model key of their shape with the rule (verified)


@dataclass
class LoadReport:
    checkpoint: str
    format: str
    selected: str | None = None  # nested entry the weights came from (None: top level)
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[Mismatch] = field(default_factory=list)
    remapped: dict[str, str] = field(default_factory=dict)
    ignored: list[str] = field(default_factory=list)
    unwrapped: list[str] = field(default_factory=list)  # wrapper prefixes removed automatically
    casts: dict[str, str] = field(default_factory=dict)  # key -> "float16->float32"
    init: str = "constructor"  # how new parameters were initialised
    suggestions: list[RemapSuggestion] = field(default_factory=list)  # verified: each makes `keys` more keys load
    declared: dict[str, str] = field(default_factory=dict)  # missing/unexpected key -> the model.add op declaring it
    tied: dict[str, str] = field(default_factory=dict)  # tied key loaded through its twin -> that twin
    nonfinite: dict[str, int] = field(default_factory=dict)  # loaded/adapted key -> how many NaN/Inf values it holds
    warnings: list[str] = field(default_factory=list)
    # checkpoint.path as a list: each file's own part (the base first), as file_entry() gives it
    files: list[dict] = field(default_factory=list)

    @property
    def counts(self) -> dict[str, int]:
        return {
            "loaded": len(self.loaded),
            "missing": len(self.missing),
            "unexpected": len(self.unexpected),
            "mismatched": len(self.mismatched),
            "remapped": len(self.remapped),
            "ignored": len(self.ignored),
        }

    @property
    def new_keys(self) -> set[str]:
        """Model keys whose values did not come (whole) from the checkpoint."""
        return set(self.missing) | {m.key for m in self.mismatched}

    def sources(self) -> dict[str, str]:
        """Model key -> checkpoint | new | adapted, for every key the checkpoint did not fully provide.

        Keys absent from the result were loaded from the checkpoint.
        """
        found = {key: "new" for key in self.missing}
        found.update({m.key: "adapted" if m.action == "adapted" else "new" for m in self.mismatched})
        return found

    def file_entry(self) -> dict:
        """This report as one file's part of several: what it filled and what it renamed."""
        return {"checkpoint": self.checkpoint, "format": self.format,
                "counts": {k: v for k, v in self.counts.items() if k not in ("missing", "mismatched")},
                "loaded": list(self.loaded), "unexpected": list(self.unexpected), "remapped": dict(self.remapped)}

    def to_json(self) -> dict:
        body = asdict(self)
        if not body["files"]:
            del body["files"]
        return {
            "checkpoint": body.pop("checkpoint"),
            "format": body.pop("format"),
            "counts": self.counts,
            **body,
        }
