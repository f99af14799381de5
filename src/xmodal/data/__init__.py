"""Data generation and reading: meshes -> rendered views + point clouds -> dataset store."""
