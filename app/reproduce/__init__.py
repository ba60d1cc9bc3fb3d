"""Reproductions of the seed papers' tables and figures under each paper's own protocol, scaled to a small CPU
(``python -m app study reproduce --paper NAME``). One module per paper: :mod:`app.reproduce.geoedit`."""
