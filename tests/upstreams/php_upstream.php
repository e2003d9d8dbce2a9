<?php
// An upstream written the way PHP services are, served by PHP's built-in server: JSON bodies read
// with json_decode (the last of repeated names wins), forms with $_POST (which turns `a.b` and
// `a b` into `a_b` and `a[b]` into arrays). Every call it executes is appended to the log file
// named by UPSTREAM_LOG as one JSON line: what really ran.
//
// `/deploy` reads its parameters from $_REQUEST (query and body merged, the body winning).
//
// Usage: UPSTREAM_LOG=FILE php -S 127.0.0.1:PORT php_upstream.php

function executed(array $entry): void
{
    $entry['server'] = 'php';
    file_put_contents(getenv('UPSTREAM_LOG'), json_encode($entry) . "\n", FILE_APPEND | LOCK_EX);
}

function reply(int $status, $value): void
{
    http_response_code($status);
    header('Content-Type: application/json');
    echo json_encode($value);
}

function body(): ?array
{
    $type = $_SERVER['CONTENT_TYPE'] ?? '';
    if (str_starts_with($type, 'application/x-www-form-urlencoded')) {
        return $_POST;
    }
    $decoded = json_decode(file_get_contents('php://input'), true);
    return is_array($decoded) ? $decoded : null;
}

$path = parse_url($_SERVER['REQUEST_URI'], PHP_URL_PATH);
if ($_SERVER['REQUEST_METHOD'] !== 'POST') {
    reply(405, ['error' => 'POST only']);
    return true;
}
$call = body();
if ($call === null) {
    reply(400, ['error' => 'unreadable body']);
    return true;
}
switch ($path) {
    case '/volumes/delete':
        $volume = $call['volumeId'] ?? null;
        executed(['route' => 'delete_volume', 'volumeId' => $volume, 'content_type' => $_SERVER['CONTENT_TYPE'] ?? '']);
        reply(200, ['deleted' => $volume]);
        break;
    case '/deploy':
        // Parameters as many handlers read them: $_REQUEST (query and body merged, the body
        // winning), and a version header that picks behaviour.
        executed([
            'route' => 'deploy',
            'get_env' => $_GET['env'] ?? null,
            'request_env' => $_REQUEST['env'] ?? null,
            'api_version' => $_SERVER['HTTP_X_API_VERSION'] ?? null,
        ]);
        reply(200, ['env' => $_REQUEST['env'] ?? null]);
        break;
    case '/deployments/scale':
        executed(['route' => 'scale_deployment', 'namespace' => $call['namespace'] ?? null, 'deployment' => $call['deployment'] ?? null]);
        reply(200, $call);
        break;
    default:
        reply(404, ['error' => 'no such route']);
}
return true;
