"""SQL written for SQLite, rewritten for PostgreSQL: the one place the two dialects differ.

The rooms write SQLite's SQL (`?` placeholders, `INSERT OR IGNORE`, scalar `MAX(a, b)`,
`instr`); `to_postgres` rewrites a statement once (cached) into PostgreSQL's, and
`schema_to_postgres` rewrites a migration's DDL (64-bit integers, double precision,
identity keys). It parses no more SQL than those rewrites need (quoted text is left
alone) and must not learn any table's rules: the rooms own those.
"""

from __future__ import annotations

import re
from functools import lru_cache

from common.errors import TesseraError

#: `INSERT OR REPLACE` needs the conflict target on PostgreSQL: each table's key.
PRIMARY_KEYS: dict[str, tuple[str, ...]] = {
    "accounts": ("name",),
    "nodes": ("id",),
    "jobs": ("id",),
    "tasks": ("id",),
    "blocklist": ("job_id", "node_id"),
    "frames": ("job_id", "frame"),
    "previews": ("task_id",),
    "ledger_txns": ("id",),
    "providers": ("account",),
    "receipts": ("lease_id",),
}


class DialectError(TesseraError):
    """A statement uses SQLite SQL that has no PostgreSQL rewrite here yet."""


def _split_quoted(sql: str) -> list[tuple[bool, str]]:
    """The statement as (is_quoted, text) pieces: '...' literals and "..." names apart."""
    pieces: list[tuple[bool, str]] = []
    start = i = 0
    while i < len(sql):
        ch = sql[i]
        if ch in "'\"":
            end = i + 1
            while end < len(sql):
                if sql[end] == ch:
                    if end + 1 < len(sql) and sql[end + 1] == ch:  # doubled quote
                        end += 2
                        continue
                    break
                end += 1
            pieces.append((False, sql[start:i]))
            pieces.append((True, sql[i : end + 1]))
            start = i = end + 1
        else:
            i += 1
    pieces.append((False, sql[start:]))
    return pieces


def _args_span(text: str, open_paren: int) -> list[int]:
    """The positions of the commas at the top level of the parenthesis at `open_paren`."""
    depth, commas = 0, list[int]()
    for i in range(open_paren, len(text)):
        ch = text[i]
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
            if depth == 0:
                return commas
        elif ch == "," and depth == 1:
            commas.append(i)
    raise DialectError(f"unbalanced parentheses in {text!r}")


_SCALAR = re.compile(r"\b(MAX|MIN)\s*\(", re.IGNORECASE)


def _scalar_min_max(text: str) -> str:
    """SQLite's two-argument MAX/MIN (scalar) -> GREATEST/LEAST; aggregates stay."""
    out, pos = [], 0
    for match in _SCALAR.finditer(text):
        if match.start() < pos:
            continue
        commas = _args_span(text, match.end() - 1)
        if commas:
            name = "GREATEST" if match.group(1).upper() == "MAX" else "LEAST"
            out.append(text[pos : match.start()] + name + "(")
            pos = match.end()
    out.append(text[pos:])
    return "".join(out)


_FUNCTIONS = (
    (re.compile(r"\binstr\s*\(", re.IGNORECASE), "strpos("),
    (re.compile(r"\bifnull\s*\(", re.IGNORECASE), "COALESCE("),
)
_OR_IGNORE = re.compile(r"^\s*INSERT\s+OR\s+IGNORE\s+INTO\b", re.IGNORECASE)
_OR_REPLACE = re.compile(r"^\s*INSERT\s+OR\s+REPLACE\s+INTO\s+(\w+)\s*\(([^)]*)\)", re.IGNORECASE)


def _rewrite(text: str) -> str:
    """The rewrites of text outside quotes (quoted pieces are masked by `to_postgres`)."""
    text = text.replace("%", "%%").replace("?", "%s")
    for pattern, name in _FUNCTIONS:
        text = pattern.sub(name, text)
    return _scalar_min_max(text) if _SCALAR.search(text) else text


@lru_cache(maxsize=4096)
def to_postgres(sql: str) -> str:
    """The PostgreSQL form of one SQLite statement (placeholders become `%s`)."""
    quoted: list[str] = []
    masked = []
    for is_quoted, piece in _split_quoted(sql):
        if is_quoted:
            masked.append(f"\x00{len(quoted)}\x00")
            quoted.append(piece.replace("%", "%%"))
        else:
            masked.append(piece)
    body = re.sub(r"\x00(\d+)\x00", lambda m: quoted[int(m.group(1))], _rewrite("".join(masked)))
    stripped = body.rstrip().rstrip(";")
    if _OR_IGNORE.match(stripped):
        return _OR_IGNORE.sub("INSERT INTO", stripped, count=1) + " ON CONFLICT DO NOTHING"
    if replace := _OR_REPLACE.match(stripped):
        table, columns = replace.group(1).lower(), replace.group(2)
        keys = PRIMARY_KEYS.get(table)
        if keys is None:
            raise DialectError(
                f"INSERT OR REPLACE INTO {table}: its key is not in dialect.PRIMARY_KEYS;"
                " add it there."
            )
        names = [c.strip() for c in columns.split(",")]
        updates = ", ".join(f"{c} = EXCLUDED.{c}" for c in names if c not in keys)
        action = f"DO UPDATE SET {updates}" if updates else "DO NOTHING"
        head = re.sub(r"\s+OR\s+REPLACE", "", stripped, count=1, flags=re.IGNORECASE)
        return f"{head} ON CONFLICT ({', '.join(keys)}) {action}"
    return stripped


_DDL = (
    (re.compile(r"\bINTEGER\s+PRIMARY\s+KEY\s+AUTOINCREMENT\b", re.I), "BIGSERIAL PRIMARY KEY"),
    (re.compile(r"\bINTEGER\b", re.I), "BIGINT"),
    (re.compile(r"\bREAL\b", re.I), "DOUBLE PRECISION"),
)


def schema_to_postgres(statement: str) -> str:
    """A migration statement (DDL) in PostgreSQL's types: SQLite's INTEGER holds 64 bits
    (milli-credits) and its REAL is a double (epoch seconds), PostgreSQL's are smaller."""
    for pattern, replacement in _DDL:
        statement = pattern.sub(replacement, statement)
    return statement
