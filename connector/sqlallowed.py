"""What a peer's SQL may use: the functions and expression classes the guard allows, the
classes it refuses with a reason, and relation names that are never datasets."""

from __future__ import annotations

import re

# Scalar functions and operators as DuckDB's parser names them. Deliberately absent: anything
# that runs SQL from a string (query, query_table, json_execute_serialized_sql), reads files
# or the network, shows settings, the catalog or the host (current_setting, duckdb_*,
# pragma_*, version, getenv), and randomness that could be seeded (setseed).
SCALAR_FUNCTIONS = frozenset(
    """
    + - * / // % ^ ** & | << >> ~ ! || ~~ !~~ ~~* !~~* ~~~ !~~~ ^@ @> <@ && <-> <=>
    abs ceil ceiling floor round trunc sign sqrt cbrt exp ln log log2 log10 pow power
    greatest least mod pi degrees radians sin cos tan asin acos atan atan2 even factorial
    gcd lcm isnan isinf isfinite bit_count xor
    lower upper lcase ucase length len strlen char_length character_length substring substr
    left right concat concat_ws trim ltrim rtrim lpad rpad replace reverse repeat
    starts_with ends_with prefix suffix contains position strpos instr split_part
    string_split regexp_matches regexp_full_match regexp_replace regexp_extract
    like_escape ilike_escape not_like_escape not_ilike_escape format printf
    ascii chr unicode initcap translate md5 sha256 hash levenshtein jaccard
    date_trunc datetrunc date_part datepart date_diff datediff date_sub datesub date_add
    year month day week weekofyear quarter hour minute second millisecond microsecond
    dayofweek dayofmonth dayofyear isodow isoyear yearweek weekday epoch epoch_ms
    era decade century millennium julian last_day monthname dayname make_date make_time
    make_timestamp strftime strptime try_strptime to_days to_hours to_minutes to_seconds
    to_weeks to_months to_years to_milliseconds to_microseconds timezone age
    current_date today now get_current_timestamp current_timestamp time_bucket
    coalesce nullif ifnull if iff typeof
    list_value list_pack struct_pack row array_extract list_extract struct_extract
    array_length list_contains list_has array_contains list_sort array_sort list_distinct
    list_aggregate list_unique len cardinality
    """.split()
)

AGGREGATE_FUNCTIONS = frozenset(
    """
    count count_star sum avg mean min max median mode quantile quantile_cont quantile_disc
    stddev stddev_samp stddev_pop variance var_samp var_pop corr covar_pop covar_samp
    regr_slope regr_intercept regr_r2 approx_count_distinct approx_quantile
    bool_and bool_or every any_value first last arg_min arg_max argmin argmax
    min_by max_by product bit_and bit_or bit_xor string_agg group_concat listagg list
    array_agg histogram entropy kurtosis skewness sum_no_overflow fsum favg
    """.split()
)

WINDOW_FUNCTIONS = frozenset(
    """
    row_number rank dense_rank percent_rank cume_dist ntile lag lead first_value
    last_value nth_value
    """.split()
)

FUNCTIONS = SCALAR_FUNCTIONS | AGGREGATE_FUNCTIONS | WINDOW_FUNCTIONS

# Expression classes the walker understands; anything else is refused.
EXPRESSION_CLASSES = frozenset(
    {
        "COLUMN_REF",
        "CONSTANT",
        "FUNCTION",
        "COMPARISON",
        "CONJUNCTION",
        "OPERATOR",
        "CASE",
        "CAST",
        "BETWEEN",
        "SUBQUERY",
        "WINDOW",
        "STAR",
        "COLLATE",
        "POSITIONAL_REFERENCE",
        "TYPE",
    }
)
REFUSED_CLASSES = {
    "PARAMETER": "prepared-statement parameters ($1, ?) are not allowed; write the values",
    "LAMBDA": "lambda functions are not allowed",
    "LAMBDA_REF": "lambda functions are not allowed",
    "DEFAULT": "DEFAULT is not allowed in a query",
}
RESERVED_PREFIXES = ("duckdb_", "sqlite_", "pg_", "information_schema", "_connector")
PATH_LIKE = re.compile(r"[/\\.:]")
