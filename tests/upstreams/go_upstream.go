// An upstream written the way Go services are: the standard library's net/http and
// encoding/json, decoding JSON bodies into structs (encoding/json matches member names to fields
// case-insensitively, with Unicode simple case folding, and keeps the last match) and forms with
// ParseForm. It serves a REST route and an MCP endpoint (JSON-RPC over POST, tool arguments
// decoded into structs as Go MCP servers do), and appends every call it executes to the log file
// as one JSON line: what really ran.
//
// Usage: go_upstream PORT LOG   (PORT 0: any; prints "listening on PORT" once it listens)
package main

import (
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"strings"
	"sync"
)

var logMutex sync.Mutex
var logPath string

func executed(entry map[string]interface{}) {
	entry["server"] = "go"
	line, _ := json.Marshal(entry)
	logMutex.Lock()
	defer logMutex.Unlock()
	file, err := os.OpenFile(logPath, os.O_APPEND|os.O_WRONLY|os.O_CREATE, 0o644)
	if err != nil {
		return
	}
	defer file.Close()
	file.Write(append(line, '\n'))
}

type deleteVolume struct {
	VolumeID string `json:"volumeId"`
	Note     string `json:"note"`
}

type scaleDeployment struct {
	Namespace  string `json:"namespace"`
	Deployment string `json:"deployment"`
	Replicas   int    `json:"replicas"`
}

func reply(writer http.ResponseWriter, status int, value interface{}) {
	writer.Header().Set("Content-Type", "application/json")
	writer.WriteHeader(status)
	json.NewEncoder(writer).Encode(value)
}

// POST /volumes/delete: a JSON body (any */json type) or a form, as many Go handlers accept both.
func volumesDelete(writer http.ResponseWriter, request *http.Request) {
	var call deleteVolume
	contentType := request.Header.Get("Content-Type")
	if strings.HasPrefix(contentType, "application/x-www-form-urlencoded") {
		if err := request.ParseForm(); err != nil {
			reply(writer, 400, map[string]string{"error": err.Error()})
			return
		}
		call.VolumeID = request.PostForm.Get("volumeId")
		call.Note = request.PostForm.Get("note")
	} else {
		body, _ := io.ReadAll(request.Body)
		if err := json.Unmarshal(body, &call); err != nil {
			reply(writer, 400, map[string]string{"error": err.Error()})
			return
		}
	}
	executed(map[string]interface{}{"route": "delete_volume", "volumeId": call.VolumeID, "content_type": contentType})
	reply(writer, 200, map[string]string{"deleted": call.VolumeID})
}

// POST /deploy: r.FormValue, which reads the body's form before the query.
func deploy(writer http.ResponseWriter, request *http.Request) {
	executed(map[string]interface{}{"route": "deploy", "query_env": request.URL.Query().Get("env"), "formvalue_env": request.FormValue("env")})
	reply(writer, 200, map[string]string{"env": request.FormValue("env")})
}

// POST /deployments/scale
func deploymentsScale(writer http.ResponseWriter, request *http.Request) {
	var call scaleDeployment
	body, _ := io.ReadAll(request.Body)
	if err := json.Unmarshal(body, &call); err != nil {
		reply(writer, 400, map[string]string{"error": err.Error()})
		return
	}
	executed(map[string]interface{}{"route": "scale_deployment", "namespace": call.Namespace, "deployment": call.Deployment, "replicas": call.Replicas})
	reply(writer, 200, call)
}

type rpcMessage struct {
	JSONRPC string          `json:"jsonrpc"`
	ID      json.RawMessage `json:"id,omitempty"`
	Method  string          `json:"method"`
	Params  json.RawMessage `json:"params,omitempty"`
}

type toolCall struct {
	Name      string          `json:"name"`
	Arguments json.RawMessage `json:"arguments"`
}

var tools = []map[string]interface{}{
	{"name": "scale_deployment", "description": "Scale a deployment of a namespace.", "inputSchema": map[string]interface{}{"type": "object"}},
	{"name": "delete_volume", "description": "Delete a volume.", "inputSchema": map[string]interface{}{"type": "object"}},
}

func answer(message rpcMessage) map[string]interface{} {
	result := func(value interface{}) map[string]interface{} {
		return map[string]interface{}{"jsonrpc": "2.0", "id": message.ID, "result": value}
	}
	failure := func(code int, text string) map[string]interface{} {
		return map[string]interface{}{"jsonrpc": "2.0", "id": message.ID, "error": map[string]interface{}{"code": code, "message": text}}
	}
	switch message.Method {
	case "initialize":
		return result(map[string]interface{}{"protocolVersion": "2025-06-18", "capabilities": map[string]interface{}{"tools": map[string]interface{}{}}, "serverInfo": map[string]string{"name": "go-upstream", "version": "1"}})
	case "tools/list":
		executed(map[string]interface{}{"route": "mcp", "method": "tools/list"})
		return result(map[string]interface{}{"tools": tools})
	case "tools/call":
		var call toolCall
		if err := json.Unmarshal(message.Params, &call); err != nil {
			return failure(-32602, err.Error())
		}
		switch call.Name {
		case "scale_deployment":
			var arguments scaleDeployment
			if err := json.Unmarshal(call.Arguments, &arguments); err != nil {
				return failure(-32602, err.Error())
			}
			executed(map[string]interface{}{"route": "mcp", "tool": "scale_deployment", "namespace": arguments.Namespace, "deployment": arguments.Deployment, "replicas": arguments.Replicas})
			return result(map[string]interface{}{"content": []map[string]string{{"type": "text", "text": fmt.Sprintf("scaled %s/%s to %d", arguments.Namespace, arguments.Deployment, arguments.Replicas)}}})
		case "delete_volume":
			var arguments deleteVolume
			if err := json.Unmarshal(call.Arguments, &arguments); err != nil {
				return failure(-32602, err.Error())
			}
			executed(map[string]interface{}{"route": "mcp", "tool": "delete_volume", "volumeId": arguments.VolumeID})
			return result(map[string]interface{}{"content": []map[string]string{{"type": "text", "text": "deleted " + arguments.VolumeID}}})
		}
		return failure(-32602, "unknown tool "+call.Name)
	}
	if message.ID == nil {
		return nil
	}
	return failure(-32601, "method not found")
}

// POST /mcp: one JSON-RPC message or a batch.
func mcp(writer http.ResponseWriter, request *http.Request) {
	body, _ := io.ReadAll(request.Body)
	trimmed := strings.TrimSpace(string(body))
	if strings.HasPrefix(trimmed, "[") {
		var messages []rpcMessage
		if err := json.Unmarshal(body, &messages); err != nil {
			reply(writer, 400, map[string]string{"error": err.Error()})
			return
		}
		answers := []map[string]interface{}{}
		for _, message := range messages {
			if answered := answer(message); answered != nil {
				answers = append(answers, answered)
			}
		}
		reply(writer, 200, answers)
		return
	}
	var message rpcMessage
	if err := json.Unmarshal(body, &message); err != nil {
		reply(writer, 400, map[string]string{"error": err.Error()})
		return
	}
	answered := answer(message)
	if answered == nil {
		writer.WriteHeader(202)
		return
	}
	reply(writer, 200, answered)
}

func main() {
	port, log := os.Args[1], os.Args[2]
	logPath = log
	listener, err := net.Listen("tcp", "127.0.0.1:"+port)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	fmt.Printf("listening on %d\n", listener.Addr().(*net.TCPAddr).Port)
	http.HandleFunc("/volumes/delete", volumesDelete)
	http.HandleFunc("/deployments/scale", deploymentsScale)
	http.HandleFunc("/deploy", deploy)
	http.HandleFunc("/mcp", mcp)
	http.Serve(listener, nil)
}
