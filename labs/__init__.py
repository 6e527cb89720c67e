"""aisp labs: one folder per lab."""
