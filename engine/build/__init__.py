"""Demo and test model builders."""
