module forge.dev/tests/realnode/pause

go 1.26.0
