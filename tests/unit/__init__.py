"""Fast tests: no kernel, no daemon (`make test-unit`)."""
