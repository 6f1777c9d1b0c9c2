// The sandbox ("pause") image's only binary: it holds a pod's namespaces open,
// reaps orphaned children when it is PID 1 of a shared PID namespace, and
// exits 0 on SIGINT or SIGTERM. Built by scripts/realnode-build; the upstream
// pause image cannot be pulled on machines without access to registry.k8s.io.
package main

import (
	"os"
	"os/signal"
	"syscall"
)

func main() {
	signals := make(chan os.Signal, 8)
	signal.Notify(signals, syscall.SIGINT, syscall.SIGTERM, syscall.SIGCHLD)
	for s := range signals {
		if s != syscall.SIGCHLD {
			os.Exit(0)
		}
		for {
			var status syscall.WaitStatus
			pid, err := syscall.Wait4(-1, &status, syscall.WNOHANG, nil)
			if pid <= 0 || err != nil {
				break
			}
		}
	}
}
