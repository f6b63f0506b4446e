"""Tasks where quality may rise with LoRA rank, and the suites that check it.

German manual pages (`smollm2_de` in bench/quality.py's TASKS): Debian's `manpages-de` holds
German translations of ~1,300 man pages, text far from SmolLM2's pretraining. The builder
reads /usr/share/man/de/man*/*.gz in sorted order, strips the roff markup with the rules
below (no groff, so the text does not depend on its version), drops the closing translators'
section (the same credits and licence on every page), and writes one JSONL record
per page ({"text": ...}) to ~/.cache/qelalora-bench/ (QELALORA_BENCH_CACHE). qelalora's
loader then shuffles the pages with its split seed, joins them with EOS and cuts blocks:
validation and test blocks come from pages that training never sees (up to one boundary block).
If the package is missing and we are root, it is installed with apt-get.

    python bench/rank_tasks.py               # build (or find) the text and print its statistics
    nice -n 19 python bench/quality.py --suite rank_de --jobs 1 --threads 1
    nice -n 19 python bench/quality.py --suite rank_minilm200 --jobs 1 --threads 1

Suites (validation split; PEFT LoRA's rank curve says whether rank matters on a task):
  rank_de            PEFT LoRA r = 1, 4, 16, 64 on German man pages (SmolLM2, 80 steps), seed 0; then seeds 1-2
  rank_minilm200     PEFT LoRA r = 1, 4, 16, 64 on 200 Rotten Tomatoes training snippets (MiniLM, 150 steps),
                     seeds 0-2 (a cell takes about 2 min, so the seeds show the noise)
  rank_de_methods    qelalora with rank rounds (elalora) and without (fixed) at r = 4 on German man pages,
                     seed 0, then seed 1
  rank_*_test        the four methods at equal adapter-state bytes, r = 2, 3 seeds, on the test split
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from variants import _cells  # (method, variant) pairs -> quality.Cell list

CACHE = Path(os.environ.get("QELALORA_BENCH_CACHE", Path.home() / ".cache" / "qelalora-bench"))
MAN_DE = Path("/usr/share/man/de")
PACKAGE = "manpages-de"
FORMAT_VERSION = 2  # bump when the stripping rules change (the file name carries it)

# ---------------------------------------------------------------- roff -> text

# Named characters (\(xx, \[xx], \*(xx, \*[xx]) seen in manpages-de; unknown names become nothing.
GLYPHS = {
    ":a": "ä", ":o": "ö", ":u": "ü", ":A": "Ä", ":O": "Ö", ":U": "Ü", "ss": "ß", "aq": "'", "dq": '"',
    "bu": "•", "en": "–", "em": "—", "hy": "-", "mi": "-", "pl": "+", "mu": "×", "di": "÷", "eq": "=",
    "lq": "“", "rq": "”", "Bq": "„", "bq": "‚", "Fo": "«", "Fc": "»", "fo": "‹", "fc": "›", "oq": "‘", "cq": "’",
    "co": "©", "rg": "®", "tm": "™", "rs": "\\", "at": "@", "sh": "#", "Do": "$", "ti": "~", "ha": "^",
    "ga": "`", "ul": "_", "ba": "|", "br": "|", "lB": "[", "rB": "]", "lC": "{", "rC": "}", "la": "⟨", "ra": "⟩",
    "<=": "≤", ">=": "≥", "!=": "≠", "->": "→", "<-": "←", "de": "°", "+-": "±", "'e": "é", "'a": "á",
    "`e": "è", "`a": "à", "^o": "ô", "^e": "ê", "ct": "¢", "Eu": "€", "eu": "€", "ps": "¶", "sc": "§",
    "R": "®", "Tm": "™", "lh": "☜", "rh": "☞", "dg": "†", "aa": "´", "ts": "ς", "fm": "′", "sd": "″",
}
TEXT_MACROS_SPACED = {"B", "I", "SM", "SB", "SH", "SS", "UR", "MT", "OP"}
TEXT_MACROS_JOINED = {"BR", "RB", "IR", "RI", "BI", "IB"}
BREAK_MACROS = {"PP", "P", "LP", "TP", "TQ", "IP", "HP", "br", "sp", "RS", "RE", "SH", "SS", "EX", "EE", "nf", "fi",
                "in", "ti", "TS", "TE", "UE", "ME", "YS", "SY", "PD", "bp", "ne", "ce"}

_ESCAPE = re.compile(
    r"""\\(?:
        \((?P<g2>..) | \[(?P<gb>[^\]]*)\] |                       # glyphs
        \*(?:\((?P<s2>..)|\[(?P<sb>[^\]]*)\]|(?P<s1>.)) |          # strings
        f(?:\(..|\[[^\]]*\]|.) |                                   # fonts
        [nFgkmMY](?:\(..|\[[^\]]*\]|.) |                           # registers, colours, ...
        s[-+]?(?:\(\d\d|\[[^\]]*\]|'[^']*'|\d\d?) |                 # size
        [hvwlLoxXbDNRSZ]'[^']*' |                                  # motions, widths, lines
        (?P<one>.)
    )""",
    re.VERBOSE,
)
_ONE = {"-": "-", "e": "\\", "\\": "\\", " ": " ", "~": " ", "0": " ", "t": " ", ".": ".", "'": "'", "`": "`",
        "_": "_", "%": "", "&": "", "|": "", "^": "", ",": "", "/": "", ":": "", "c": "", "d": "", "u": "", "p": "",
        "!": "", "{": "", "}": "", "a": "", "r": "", "z": ""}


def _unescape(text: str) -> str:
    def sub(m: re.Match) -> str:
        name = m.group("g2") or m.group("gb") or m.group("s2") or m.group("sb") or m.group("s1")
        if name is not None:
            if name.startswith("u") and re.fullmatch(r"u[0-9A-Fa-f]{4,6}", name):
                return chr(int(name[1:], 16))
            return GLYPHS.get(name, "")
        one = m.group("one")
        return _ONE.get(one, "") if one is not None else ""

    return _ESCAPE.sub(sub, text)


def _macro_args(rest: str) -> list[str]:
    """Arguments of a macro line: blank-separated, double quotes group ("" is a literal quote)."""
    args, cur, quoted, i = [], "", False, 0
    while i < len(rest):
        ch = rest[i]
        if ch == '"':
            if quoted and rest[i + 1 : i + 2] == '"':
                cur += '"'
                i += 1
            else:
                quoted = not quoted
        elif ch in " \t" and not quoted:
            if cur:
                args.append(cur)
            cur = ""
        else:
            cur += ch
        i += 1
    if cur:
        args.append(cur)
    return args


def roff_to_text(source: str) -> str:
    """Running text of a man page: headings, paragraphs (lines joined) and no-fill blocks (lines kept)."""
    paragraphs: list[str] = []
    lines: list[str] = []
    nofill = False
    table_format = False

    def flush() -> None:
        if lines:
            text = "\n".join(lines) if nofill else " ".join(lines)
            text = re.sub(r"[ \t]+", " ", text).strip() if not nofill else text.strip("\n")
            if text.strip():
                paragraphs.append(text)
            lines.clear()

    for raw in source.splitlines():
        raw = re.sub(r'(?<!\\)\\".*', "", raw)  # comments
        if raw.startswith("\\#"):
            continue
        if table_format:  # a table's format lines end with a '.'
            if raw.rstrip().endswith("."):
                table_format = False
            continue
        if raw[:1] in (".", "'"):
            body = raw[1:].strip()
            if not body:
                continue
            name, _, rest = body.partition(" ")
            name = name.strip()
            if name in BREAK_MACROS:
                flush()
            if name == "nf" or name == "EX":
                nofill = True
            elif name in ("fi", "EE"):
                nofill = False
            elif name == "TS":
                table_format = True
            args = [_unescape(a) for a in _macro_args(rest)]
            if name == "SH" and " ".join(args).strip() == "ÜBERSETZUNG":
                break  # the translators' credits and licence, the same on every page
            if name in ("SH", "SS"):
                if args:
                    paragraphs.append(" ".join(args).strip())
            elif name in TEXT_MACROS_SPACED:
                if args:
                    lines.append(" ".join(args))
            elif name in TEXT_MACROS_JOINED:
                if args:
                    lines.append("".join(args))
            elif name == "IP" and args and args[0] not in ("•", "-", "*", "o"):
                lines.append(args[0])
            elif name == "so":
                return ""  # a link to another page
            continue
        line = raw.replace("\t", " ")
        line = re.sub(r"^T[{}]|T[{}]$", "", line.strip()) if not nofill else line
        text = _unescape(line)
        if nofill:
            lines.append(text.rstrip())
        elif text.strip():
            lines.append(text.strip())
        elif lines:  # a blank line is a paragraph break
            flush()
    flush()
    return "\n\n".join(paragraphs)


# ---------------------------------------------------------------- the data file


def _install(package: str) -> None:
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise SystemExit(f"{package} is not installed: run `sudo apt-get install {package}`")
    print(f"installing Debian package {package} ...", file=sys.stderr, flush=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    if subprocess.run(["apt-get", "install", "-y", "-q", package], env=env, check=False).returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], env=env, check=True)
        subprocess.run(["apt-get", "install", "-y", "-q", package], env=env, check=True)


def _package_version(package: str) -> str:
    out = subprocess.run(["dpkg-query", "-W", "-f=${Version}", package], capture_output=True, text=True, check=False)
    return out.stdout.strip() or "unknown"


def man_files() -> list[Path]:
    return sorted(MAN_DE.glob("man*/*.gz"))


def manpages_de() -> Path:
    """The German man pages as JSONL, one page a record, built once (deterministic: sorted files, fixed rules)."""
    if not man_files():
        _install(PACKAGE)
    version = _package_version(PACKAGE)
    out = CACHE / f"manpages-de-{version}-v{FORMAT_VERSION}.jsonl"
    if out.exists():
        return out
    records = []
    for path in man_files():
        with gzip.open(path, "rb") as f:
            text = roff_to_text(f.read().decode("utf-8", errors="replace"))
        if len(text) >= 200:  # links (.so) and stubs carry nothing to learn
            records.append({"text": text, "page": f"{path.parent.name}/{path.name.removesuffix('.gz')}"})
    CACHE.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(f".{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    tmp.replace(out)
    return out


PREPARE = {"manpages_de": manpages_de}

# ---------------------------------------------------------------- suites


_TEST_METHODS = [("lora", "eqbytes"), ("fixed", ""), ("elalora", ""), ("adalora", "")]

RANK_SUITES = {
    # seed 0 at every rank, then the ends of the curve on seeds 1 and 2 (the noise), then seed 1's middle
    "rank_de": lambda: (_cells("smollm2_de", [("lora", "")], [1, 4, 16, 64], [0], split="val")
                        + _cells("smollm2_de", [("lora", "")], [1, 64], [1, 2], split="val")
                        + _cells("smollm2_de", [("lora", "")], [4, 16], [1], split="val")),
    "rank_minilm200": lambda: _cells("minilm200", [("lora", "")], [1, 4, 16, 64], [0, 1, 2], split="val"),  # seed 0 first
    "rank_de_methods": lambda: _cells("smollm2_de", [("elalora", ""), ("fixed", "")], [4], [0, 1], split="val"),
    # the four methods where LoRA's curve is steep (r = 1-2), at equal adapter-state bytes; `floor0` lets a round
    # take a layer out, the only way rank can move at r = 1
    "rank_minilm200_methods": lambda: _cells(
        "minilm200", [("lora", "eqbytes"), ("fixed", ""), ("elalora", ""), ("elalora", "floor0"), ("adalora", "")],
        [1, 2], [0, 1, 2], split="val"),
    # qelalora's own rank curve with rounds off: moving rank can only pay if its quality moves with rank
    "rank_minilm200_fixed": lambda: _cells("minilm200", [("fixed", "")], [4, 16], [0, 1, 2], split="val"),
    # the same on German man pages (r = 4 is rank_de_methods'), seed 0 first
    "rank_de_fixed": lambda: _cells("smollm2_de", [("fixed", "")], [1, 16], [0, 1], split="val"),
    # the equal-byte comparison on the test split, read once: r = 2, on the steep part of both tasks' validation
    # curves (LoRA gains most from r = 1 to 4 on both), every method at its defaults; seed 0 first
    "rank_minilm200_test": lambda: _cells("minilm200", _TEST_METHODS, [2], [0, 1, 2]),
    "rank_de_test": lambda: _cells("smollm2_de", _TEST_METHODS, [2], [0, 1, 2]),
}


if __name__ == "__main__":
    path = manpages_de()
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    chars = sum(len(r["text"]) for r in rows)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    print(f"{path}: {len(rows)} pages, {chars:,} characters, sha256 {digest}, from {len(man_files())} files of {PACKAGE} "
          f"{_package_version(PACKAGE)}")
