"""What runs at a hospital: NHS/CHI numbers, pseudonyms and the linkage vault."""
