"""The test suite. Helpers shared between test files are modules of this package
(``from tests.generate.generate_data import make_records``)."""
