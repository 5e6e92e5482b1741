"""Root conftest: the real-server fixtures (postgres, openbao) for every test folder."""

pytest_plugins = ["testkit.fixtures", "testkit.hang_dump"]
