"""The one quoting helper: literals and paths with quotes survive DuckDB as themselves."""

from __future__ import annotations

import math

import duckdb
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
