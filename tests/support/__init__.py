"""What the tests share: fixtures, harnesses and helpers. No tests here, and no
test module imports another test module: shared code lives in this package."""
