"""Root conftest: the real-server fixtures (postgres, openbao) for every test folder."""
pytest_plugins = ["shared.testing.fixtures", "shared.testing.hang_dump"]
