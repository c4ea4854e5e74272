// What DuckDB's C API has no setting for, set on a `duckdb_config` (a `DBConfig *` behind
// the C API). build.rs compiles this against the headers of the DuckDB that libduckdb-sys
// built (DEP_DUCKDB_INCLUDE), with the same NDEBUG/DEBUG choice, so the field is where the
// library looks for it.
#include "duckdb.h"
#include "duckdb/main/config.hpp"

// Leaves the linked extensions (core_functions, json) unloaded in a database opened with
// `config`. Loading them is about half of an open: registering some 700 functions in the
// catalog, and compiling the JSON grammar.
extern "C" void nattrail_skip_linked_extensions(duckdb_config config) {
	reinterpret_cast<duckdb::DBConfig *>(config)->options.load_extensions = false;
}
