"""The schema zoo: one database with what real schemas hold (issue 10), a write
ledger on its tables, and a row-by-row comparison of blue and green."""
