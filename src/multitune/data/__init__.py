"""Task data: readers, unified records, splits, label vocabularies, tokenization, streams and samplers."""
