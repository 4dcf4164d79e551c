"""The one quoting helper: literals and paths with quotes survive DuckDB as themselves."""

from __future__ import annotations

import math

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from popflow import sql


def test_literals_round_trip_through_duckdb():
    """Each value, written with `lit`, reads back equal: quotes doubled, numbers exact, None as null."""
    con = sql.connect()
    for value in ["plain", "it's", "o''brien", "a \"quoted\" word", "x'); drop table t; --", "", "ünïcode ☃",
                  0, -7, 2**40, 0.1, -1e-300, 1 / 3, True, False]:
        assert con.sql(f"select {sql.lit(value)}").fetchall() == [(value,)], value
    assert con.sql(f"select {sql.lit(None)} is null").fetchall() == [(True,)]
    inf, nan = con.sql(f"select {sql.lit(math.inf)}, {sql.lit(math.nan)}").fetchall()[0]
    assert inf == math.inf and math.isnan(nan)


def test_paths_with_quotes_and_spaces_are_read(tmp_path):
    """A folder like /home/o'brien/my data: read_parquet through `parquet` finds the file."""
    folder = tmp_path / "o'brien" / "my data"
    folder.mkdir(parents=True)
    pq.write_table(pa.table({"x": [1, 2]}), folder / "part-0.parquet")
    assert sql.connect().sql(f"select sum(x) from {sql.parquet(folder / '*.parquet')}").fetchall() == [(3,)]


def test_values_lists_and_the_empty_list():
    con = sql.connect()
    ids = sql.values(["a", "it's"])
    assert con.sql(f"select 'it''s' in {ids}").fetchall() == [(True,)]
    assert con.sql(f"select count(*) from range(3) where range in {sql.values([])}").fetchall() == [(0,)]


def test_identifiers_are_quoted():
    con = duckdb.connect()
    name = sql.ident('we"ird name')
    con.execute(f"create view {name} as select 1 as one")
    assert con.sql(f"select one from {name}").fetchall() == [(1,)]


@pytest.mark.parametrize("query, allowed", [
    ("select 1", True), ("with a as (select 1) select * from a", True), ("explain select 1", True),
    ("/* why */ explain select 1", True), ("pivot (select 1 as a, 'x' as m) on m using sum(a)", True),
    ("copy (select 1) to 'x.csv'", False), ("attach 'x.db'", False), ("set threads = 1", False),
    ("explain analyze select 1", False),  # EXPLAIN ANALYZE runs what it explains: refused whatever it is
    ("explain analyze copy (select 1) to 'x.csv'", False), ("explain /* c */ analyze copy (select 1) to 'x'", False),
    ("explain (analyze) copy (select 1) to 'x.csv'", False),
    ("explain --\ranalyze copy (select 1) to 'x.csv'", False),  # a comment DuckDB ends at a carriage return
    ("select 1; copy (select 1) to 'x.csv'", False),
])
def test_only_queries_pass_the_read_only_check(query, allowed):
    import duckdb

    from popflow.errors import PopflowError
    from popflow.sql import check_query

    con = duckdb.connect()
    if allowed:
        check_query(con, query)
    else:
        with pytest.raises(PopflowError, match="only queries are allowed here|EXPLAIN ANALYZE runs"):
            check_query(con, query)


def test_the_t_quantile_in_sql_is_scipys_for_every_unit_count():
    """t_sql(units) against scipy's t.ppf(0.975, units - 1): exact up to df 50, the fourth-order Cornish-Fisher
    expansion beyond (Abramowitz and Stegun 26.7.5; its error at df 51 is about 2e-9 and falls as df^-5);
    null for fewer than two units. E.g. 2 units: 12.7062, 3: 4.3027, 97: 1.9850."""
    from scipy.stats import t

    con = sql.connect()
    got = dict(con.execute(f"select n, {sql.t_sql('n')} from range(0, 2001) r(n)").fetchall())
    assert got[0] is None and got[1] is None
    want = {n: float(t.ppf(0.975, n - 1)) for n in range(2, 2001)}
    assert max(abs(got[n] - want[n]) for n in want) < 3e-9
    assert (got[2], got[3], got[97]) == pytest.approx((12.7062, 4.3027, 1.9850), abs=1e-4)


def test_each_group_takes_its_own_units_t():
    """Two groups in one query: a: 0, 1, 1 (3 units: mean 2/3, sd 0.57735, t(0.975, 2) = 4.30265, half width
    4.30265 * 0.57735 / sqrt(3) = 1.43422); b: 0, 1 repeated 30 times (60 units, nulls not counted: mean 0.5,
    sd 0.50422, t(0.975, 59) = 2.00100, half 2.00100 * 0.50422 / sqrt(60) = 0.13025). One quantile for both
    groups, as a query-wide count gave, would be wrong for one of them; scipy's t.interval agrees."""
    from scipy import stats

    a, b = [0.0, 1.0, 1.0], [0.0, 1.0] * 30
    rows = pa.table({"g": ["a"] * 4 + ["b"] * 60, "x": a + [None] + b})
    con = sql.connect()
    con.register("rows", rows)
    got = {g: (m, lo, hi) for g, m, lo, hi in con.execute(
        f"select g, {sql.interval_sql('x', 'r')} from rows group by g").fetchall()}
    assert got["a"] == pytest.approx((2 / 3, 2 / 3 - 1.43422, 2 / 3 + 1.43422), abs=1e-5)
    assert got["b"] == pytest.approx((0.5, 0.5 - 0.13025, 0.5 + 0.13025), abs=1e-5)
    for g, xs in (("a", a), ("b", b)):
        assert got[g][1:] == pytest.approx(stats.t.interval(0.95, len(xs) - 1, loc=np.mean(xs), scale=stats.sem(xs)))
