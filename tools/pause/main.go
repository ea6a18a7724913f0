// Command pause is the process of a pod sandbox (the image localhost/pause:3.10 of the local
// cluster, made by scripts/build-node-images): it holds the pod's namespaces open and does nothing
// else until it is told to stop.
//
// It runs as PID 1 of the pod's PID namespace, and the kernel drops every signal a PID 1 has no
// handler for: without its own SIGTERM/SIGINT handling the runtime could only SIGKILL it, after the
// stop timeout. As PID 1 it also inherits the pod's orphaned processes when the pod shares one PID
// namespace, so it reaps them (on SIGCHLD) instead of leaving zombies behind. Upstream's pause is a
// C program doing the same; this one is Go so that scripts/build-tools builds it like every other
// tool, static, with no C toolchain.
package main

import (
	"fmt"
	"os"
	"os/signal"
	"syscall"
)

const version = "3.10"

func main() {
	if len(os.Args) > 1 && (os.Args[1] == "-v" || os.Args[1] == "--version") {
		fmt.Println("pause", version)
		return
	}
	signals := make(chan os.Signal, 16)
	signal.Notify(signals, syscall.SIGINT, syscall.SIGTERM, syscall.SIGCHLD)
	// Only now is a SIGTERM handled (until Notify the Go runtime's default kills the process, or
	// as PID 1 makes it exit 2), so the line says when it is safe to signal: tests wait for it.
	// The sandbox's output goes nowhere in a pod.
	if os.Getpid() != 1 {
		fmt.Fprintln(os.Stderr, "Warning: pause should be the first process")
	}
	fmt.Fprintf(os.Stderr, "pause %s: ready, stopping on SIGTERM or SIGINT\n", version)
	for sig := range signals {
		if sig == syscall.SIGCHLD {
			reap()
			continue
		}
		fmt.Fprintf(os.Stderr, "Shutting down, got signal: %v\n", sig)
		os.Exit(0)
	}
}

// reap collects every child that has exited. One SIGCHLD may stand for several children (the
// signal does not queue), so it waits without blocking until none is left.
func reap() {
	for {
		var status syscall.WaitStatus
		pid, err := syscall.Wait4(-1, &status, syscall.WNOHANG, nil)
		if err == syscall.EINTR {
			continue
		}
		if pid <= 0 || err != nil {
			return
		}
	}
}
