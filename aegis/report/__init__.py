"""Reports: aggregate bench, probe and sweep results into ranked CSV, Markdown and HTML with plots."""
