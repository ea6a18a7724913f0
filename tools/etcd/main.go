// Command etcd is upstream etcd's server, built from go.etcd.io/etcd/server/v3 at the version
// pinned in go.mod. Upstream's own main package lives in a module we cannot `go install` at a pin,
// so this one-line main calls the same entry point.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() {
	etcdmain.Main(os.Args)
}
