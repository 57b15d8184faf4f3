"""Runs psycopg2's own test suite, or the named tests of it, against the database that the
PSYCOPG2_TESTDB* variables name; prints one `FAILED <test id>` line per failure or error and a
`RESULT <run> <failed> <skipped>` line. Run with the cached environment's python from inside
the suite's source directory."""
import os
import sys
import unittest

sys.path.insert(0, os.getcwd())
import tests  # noqa: E402  (the suite, from the current directory)

if len(sys.argv) > 1:
    suite = unittest.defaultTestLoader.loadTestsFromNames(sys.argv[1:])
else:
    suite = tests.test_suite()
result = unittest.TextTestRunner(verbosity=0, stream=sys.stderr).run(suite)
for case, _ in result.failures + result.errors:
    print("FAILED", case.id())
print("RESULT", result.testsRun, len(result.failures) + len(result.errors), len(result.skipped))
