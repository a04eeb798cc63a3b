"""Load tests: many concurrent real pulls through one regproxy process."""
