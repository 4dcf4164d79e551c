"""The one way popflow writes SQL: every literal and path goes through `lit`, every stage opens its own
DuckDB connection with `connect`, and queries are named CTEs ending in `final`.

    from popflow import sql
    con = sql.connect()
    con.sql(f"with final as (select * from {sql.parquet(ctx.glob('pairs'))} where pair_id = {sql.lit(pid)}) "
            "select * from final")

A path with a quote (/home/o'brien) or a prompt_id like "it's" is quoted, never spliced; numbers are
written with repr (no locale, full precision; floats typed double); None is null.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable
from pathlib import Path


def lit(value: str | Path | float | int | bool | None) -> str:
    """A SQL literal: strings and paths single-quoted with quotes doubled, numbers as themselves."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):  # typed: DuckDB reads a bare 0.1 as a DECIMAL
        return f"{value!r}::double" if math.isfinite(value) else f"'{value}'::double"
    return "'" + str(value).replace("'", "''") + "'"


def ident(name: str) -> str:
    """A double-quoted identifier (a table or view name taken from the lake's folders)."""
    return '"' + name.replace('"', '""') + '"'


def parquet(glob: str | Path) -> str:
    """`read_parquet('<glob>')` with the glob quoted."""
    return f"read_parquet({lit(glob)})"


def values(items: Iterable) -> str:
    """A parenthesised list of literals for `in (...)`; `(null)` for none (matches nothing)."""
    body = ", ".join(lit(v) for v in items)
    return f"({body or 'null'})"


def connect():
    """A new in-memory DuckDB connection: one per stage, never the process-global `duckdb.sql`."""
    import duckdb

    return duckdb.connect()


def check_query(con, query: str) -> None:
    """Refuse anything but queries (SELECT and its forms: WITH, FROM, DESCRIBE, SHOW, SUMMARIZE, PIVOT) and plain
    EXPLAIN before DuckDB runs it: `popflow sql` reads the lake and writes nothing (no COPY, CREATE, ATTACH,
    SET ...). EXPLAIN ANALYZE runs what it explains, so any EXPLAIN whose text says ANALYZE is refused: parsing
    the statement after it by hand is how a COPY would slip through."""
    import re

    import duckdb

    from popflow.errors import PopflowError

    queries = {duckdb.StatementType.SELECT, duckdb.StatementType.MULTI}  # MULTI: what PIVOT parses to
    try:
        statements = con.extract_statements(query)
    except duckdb.Error as exc:
        raise PopflowError(f"SQL error: {exc}") from None
    for statement in statements:
        kind = statement.type
        if kind == duckdb.StatementType.EXPLAIN and re.search(r"analy[sz]e", statement.query, flags=re.IGNORECASE):
            raise PopflowError("SQL: EXPLAIN ANALYZE runs the statement it explains; use EXPLAIN (the lake is "
                               "read-only here)")
        if kind not in queries | {duckdb.StatementType.EXPLAIN}:
            raise PopflowError(f"SQL: only queries are allowed here (the lake is read-only); got a {kind.name} "
                               "statement")


def interval_sql(column: str, name: str, lowest: float | None = None, highest: float | None = None) -> str:
    """Aggregates `name` (the mean of `column` over a group's units, its non-null values) and its interval
    name_low, name_high: mean -/+ t * sd / sqrt(units), t the two-sided 95% Student t quantile for the group's own
    units (t_sql), clipped to [lowest, highest] where given; null with fewer than two units."""
    units = f"count({column})"
    half, known = f"{t_sql(units)} * stddev_samp({column}) / sqrt({units})", f"{units} > 1"
    low, high = f"avg({column}) - {half}", f"avg({column}) + {half}"
    # (DuckDB's greatest and least skip a null: the case keeps "no interval" null)
    if lowest is not None:
        low = f"greatest({low}, {lit(float(lowest))})"
    if highest is not None:
        high = f"least({high}, {lit(float(highest))})"
    return (f"avg({column}) as {name}, case when {known} then {low} end as {name}_low, "
            f"case when {known} then {high} end as {name}_high")


def student_t(level: float, df: int) -> float:
    """The Student t quantile at `level` with `df` degrees of freedom."""
    from scipy.stats import t

    return float(t.ppf(level, df))


@functools.cache
def _t_exact() -> str:
    return ", ".join(repr(student_t(0.975, df)) for df in range(1, T_EXACT + 1))


T_EXACT = 50  # degrees of freedom up to which t_sql writes scipy's quantile; beyond, the expansion


def t_sql(units: str) -> str:
    """The two-sided 95% Student t quantile over `units` units (a SQL integer expression, df = units - 1) as a
    SQL expression: scipy's value for df <= T_EXACT, beyond it the Cornish-Fisher expansion of t in 1/df to the
    fourth order (Abramowitz and Stegun 26.7.5: off by under 3e-9 at df 50, less as df grows); null below 2."""
    from scipy.stats import norm

    exact, z = _t_exact(), float(norm.ppf(0.975))
    terms = [(z**3 + z) / 4, (5 * z**5 + 16 * z**3 + 3 * z) / 96, (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / 384,
             (79 * z**9 + 776 * z**7 + 1482 * z**5 - 1920 * z**3 - 945 * z) / 92160]
    df = f"({units} - 1)::double"
    series = " + ".join([repr(z)] + [f"{g!r} / {df} ^ {i}" for i, g in enumerate(terms, 1)])
    return (f"(case when {units} < 2 then null::double when {units} <= {T_EXACT + 1} "
            f"then [{exact}][{units} - 1] else {series} end)")
